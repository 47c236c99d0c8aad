"""concat_linear and dense_matmul on small modules: merges, near misses, numerics."""
import torch

import zen_inductor
from zen_inductor import config

from conftest import compile_zen, quantize, sqnr

K = 128


class ThreeHeads(torch.nn.Module):
    def __init__(self, bias):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(K, 64, bias=bias)
        self.b = torch.nn.Linear(K, 96, bias=False)
        self.c = torch.nn.Linear(K, 32, bias=bias)

    def forward(self, x):
        return self.a(x) * 2, self.b(x).sum(-1), self.c(x)


def _check(model, x):
    with torch.no_grad():
        eager = model(x)
        zen = compile_zen(model)(x)
    for e, z in zip(eager, zen):
        assert sqnr(z, e) >= 35


def test_three_dense_linears_with_mixed_bias_merge_once():
    m = ThreeHeads(bias=True).to(torch.bfloat16).eval()
    _check(m, torch.randn(2, 5, K, dtype=torch.bfloat16))
    assert zen_inductor.counters["concat_linear"] == 1
    assert zen_inductor.counters["concat_linear.3way_dense_bfloat16"] == 1
    assert zen_inductor.counters["dense_matmul"] == 1  # the merged GEMM, tuned per bin


def test_quantized_linears_merge_before_packing():
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    m = quantize(ThreeHeads(bias=True).to(torch.bfloat16).eval(),
                 IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
    _check(m, torch.randn(7, K, dtype=torch.bfloat16))
    assert zen_inductor.counters["dequant_matmul"] == 3
    assert zen_inductor.counters["concat_linear"] == 1
    match = [mt for mt in zen_inductor.last_report()["matches"] if mt["pattern"] == "concat_linear"][0]
    assert match["variant"].startswith("3way_wo_int4_g32")


def test_incompatible_quantization_is_left_apart_and_explained():
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    m = ThreeHeads(bias=False).to(torch.bfloat16).eval()
    quantize(m.a, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
    quantize(m.b, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
    quantize(m.c, Int8WeightOnlyConfig())
    _check(m, torch.randn(3, K, dtype=torch.bfloat16))
    assert zen_inductor.counters["concat_linear"] == 1  # a and b
    misses = [n for n in zen_inductor.last_report()["near_misses"] if n["pattern"] == "concat_linear"]
    assert len(misses) == 1
    assert "bits (4 vs 8)" in misses[0]["reason"] or "bits (8 vs 4)" in misses[0]["reason"]


def test_dense_matmul_off_leaves_bf16_linears_to_inductor():
    m = ThreeHeads(bias=False).to(torch.bfloat16).eval()
    with config.patch(dense_matmul=False, concat_linear=False):
        _check(m, torch.randn(3, K, dtype=torch.bfloat16))
    assert sum(zen_inductor.counters.values()) == 0


@torch.library.custom_op("serving_engine::packed_linear", mutates_args=())
def _engine_linear(x: torch.Tensor, packed: torch.Tensor, is_weight_prepacked: bool = True) -> torch.Tensor:
    return x @ packed


@_engine_linear.register_fake
def _(x, packed, is_weight_prepacked=True):
    return x.new_empty(x.shape[0], packed.shape[1])


def test_a_linear_in_another_librarys_op_is_left_to_it_and_said():
    """vLLM runs its linears in its own ops (zentorch's on prepacked weights on Zen 4): zen cannot
    read such a weight, leaves the op as it is and says so, next to the bf16 linear it does take."""

    class Engine(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.packed = torch.nn.Parameter(torch.randn(128, 64, dtype=torch.bfloat16), requires_grad=False)
            self.plain = torch.nn.Linear(64, 32, bias=False, dtype=torch.bfloat16)

        def forward(self, x):
            return self.plain(torch.ops.serving_engine.packed_linear(x, self.packed, is_weight_prepacked=True))

    m = Engine().eval()
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        y = compile_zen(m)(x)
        ref = m(x)
    report = zen_inductor.last_report()
    assert [mt["pattern"] for mt in report["matches"]] == ["dense_matmul"]
    (miss,) = [n for n in report["near_misses"] if n["pattern"] == "dense_matmul"]
    assert "left to serving_engine.packed_linear on a weight it prepacked" in miss["reason"]
    assert sqnr(y, ref) >= 40


@torch.library.custom_op("serving_engine::gemm_into", mutates_args=("out",))
def _engine_gemm_into(x: torch.Tensor, packed: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(x @ packed)


def test_a_linear_op_that_writes_into_its_output_is_said_too():
    """vLLM's oneDNN GEMM on Intel CPUs writes into an output it is given: the graph calls it
    through auto_functionalized, which zen looks through to say whose op it is."""

    class Engine(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.packed = torch.nn.Parameter(torch.randn(128, 64, dtype=torch.bfloat16), requires_grad=False)

        def forward(self, x):
            out = torch.empty(x.shape[0], 64, dtype=x.dtype)
            torch.ops.serving_engine.gemm_into(x, self.packed, out)
            return out * 2

    m = Engine().eval()
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        y = compile_zen(m)(x)
    (miss,) = [n for n in zen_inductor.last_report()["near_misses"] if n["pattern"] == "dense_matmul"]
    assert miss["reason"].startswith("left to serving_engine.gemm_into: a linear in another library's op")
    assert torch.equal(y, m(x))
