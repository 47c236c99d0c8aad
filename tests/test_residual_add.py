"""residual_add: the residual adds after linears done by the linears' op, the stream in fp32."""
import torch
from torch._inductor.utils import run_and_get_code

import zen_inductor
from zen_inductor import config, verification

from conftest import compile_zen, eager_and_zen, sqnr
from quantized import quant_linear_calls

H, VOCAB = 128, 64


class Stack(torch.nn.Module):
    """A decoder's residual stream: norm, linear, add, per layer; the final norm reads the stream.
    ``expose`` returns one layer's linear output too (the linear's output then has another user)."""

    def __init__(self, layers: int, expose: bool = False):
        super().__init__()
        torch.manual_seed(layers)
        self.embed = torch.nn.Embedding(VOCAB, H)
        self.linears = torch.nn.ModuleList(torch.nn.Linear(H, H, bias=False) for _ in range(layers))
        for linear in self.linears:
            linear.weight.data *= 2.0  # branches as large as the stream, so its rounding shows
        self.norms = torch.nn.ParameterList(torch.rand(H) + 0.5 for _ in range(layers + 1))
        self.expose = expose
        self.to(torch.bfloat16)

    def _norm(self, h, i):
        hf = h.to(torch.float32)
        return self.norms[i] * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)

    def forward(self, ids):
        h = self.embed(ids)
        exposed = None
        for i, linear in enumerate(self.linears):
            y = linear(self._norm(h, i))
            exposed = y if self.expose and i == 0 else exposed
            h = h + y
        out = self._norm(h, len(self.linears))
        return (out, exposed) if self.expose else out


def _fp32_reference(model, ids):
    twin = torch.nn.Module.to(Stack(len(model.linears)), torch.float32)
    twin.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    with torch.no_grad():
        return twin(ids)


def _ids(tokens=24):
    return torch.randint(0, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(0))


def test_the_stream_is_summed_in_fp32_by_the_linears(dumped):
    model = Stack(3).eval()
    ids = _ids()
    eager, zen = eager_and_zen(model, ids)
    assert zen_inductor.counters["residual_add"] == 3
    assert zen_inductor.counters["residual_add.fp32_stream_bfloat16"] == 3
    after = dumped("after.py")
    # every linear adds its residual; the sums are fp32 and no bf16 add of the stream is left
    assert after.count("residual = ") == 3, after
    assert len(quant_linear_calls(after, 'f32[24, 128]"')) == 3
    assert 'bf16[1, 24, 128]" = torch.ops.aten.add.Tensor' not in after
    ref = _fp32_reference(model, ids)
    # no bf16 rounding of the stream between layers: closer to fp32 than eager, which rounds at every add
    assert sqnr(zen, ref) > sqnr(eager, ref)


def test_the_norm_kernels_do_not_grow_with_depth():
    """Why the family exists: with the sum left to Inductor, each layer's norm recomputes the stream
    from the embedding, so every layer is new C++ to compile. With it in the linear's op the norm
    kernel is the same code in every layer."""

    def kernels(layers: int, enabled: bool) -> set:
        torch._dynamo.reset()
        # add_rmsnorm off: with config.zentorch_add_rmsnorm its op would realize the stream as well
        with config.patch(residual_add=enabled, add_rmsnorm=False), torch.no_grad():
            _, (code, *_) = run_and_get_code(compile_zen(Stack(layers).eval()), _ids())
        return {line.split(" = ")[0] for line in code.splitlines() if line.startswith("cpp_fused")}

    assert len(kernels(4, True)) == len(kernels(2, True))
    assert len(kernels(4, False)) > len(kernels(2, False))  # the behaviour the fold removes


def test_a_linear_output_used_elsewhere_is_a_near_miss_and_stays_correct():
    model = Stack(2, expose=True).eval()
    ids = _ids()
    with torch.no_grad():
        eager_out, eager_y = model(ids)
        zen_out, zen_y = compile_zen(model)(ids)
    assert zen_inductor.counters["residual_add"] == 1  # the second layer's
    (miss,) = [n for n in zen_inductor.last_report()["near_misses"] if n["pattern"] == "residual_add"]
    assert "other users" in miss["reason"]
    assert sqnr(zen_y, eager_y) >= 40
    ref = _fp32_reference(model, ids)
    assert sqnr(zen_out, ref) >= sqnr(eager_out, ref) - 0.5


def test_no_verified_kernel_keeps_the_sum_in_fp32_as_graph_ops(monkeypatch):
    monkeypatch.setattr(verification, "SQNR_WEIGHT_ONLY_DB", 1000.0)  # every candidate fails verification
    model = Stack(2).eval()
    ids = _ids()
    with torch.no_grad():
        eager = model(ids)
        zen = compile_zen(model)(ids)
    report = zen_inductor.last_report()
    assert any("runs as a GEMM on the dequantized weight" in n["reason"] for n in report["near_misses"])
    assert zen_inductor.counters["residual_add"] == 2
    ref = _fp32_reference(model, ids)
    assert sqnr(zen, ref) > sqnr(eager, ref)


def test_dynamic_tokens():
    model = Stack(2).eval()
    fast = torch.compile(model, backend="zen", dynamic=True)
    with torch.no_grad():
        for tokens in (1, 7, 40):
            ids = _ids(tokens)
            ref = _fp32_reference(model, ids)
            assert sqnr(fast(ids), ref) >= sqnr(model(ids), ref), tokens
    assert zen_inductor.counters["residual_add"] >= 2
    assert zen_inductor.counters["residual_add.near_miss"] == 0
