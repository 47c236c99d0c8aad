"""dequant -> matmul: every CPU-quantized linear form is matched, runs fused, and is accurate."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import zen_inductor
import zen_inductor.dumps
from zen_inductor import config
from zen_inductor.cpu import zentorch_unavailable
from zen_inductor.kernels import KERNELS, Kernel

from conftest import compile_zen, quantize, sqnr
from quantized import GPTQPacked, HandDequant, K, N, TORCHAO, plain_linear, reference_output









@pytest.mark.parametrize("dtype", ["int4", "bf16"])
def test_linears_back_to_back_are_each_replaced(dtype, dumped):
    """The second linear reads the first one's output directly: when the first is rewritten, the
    second's activation is the new op. Read before any rewrite, the second kept the first's old
    matmul alive and the first's op died unused (reported as matched, computed by Inductor)."""
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    from quantized import quant_linear_calls

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(K, 2 * K), torch.nn.Linear(2 * K, K)).to(torch.bfloat16).eval()
    if dtype == "int4":
        model = quantize(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
    x = torch.randn(3, K, dtype=torch.bfloat16)
    with torch.no_grad():
        eager = model(x)
        y = compile_zen(model)(x)
    after = dumped("after.py")
    assert len(quant_linear_calls(after)) == 2 and "aten.addmm" not in after and "aten.mm" not in after, after
    assert all(m["kernels"] for m in zen_inductor.last_report()["matches"])
    assert sqnr(y, eager) >= 30


@pytest.mark.parametrize("name", sorted(TORCHAO))
def test_torchao_weight_only(name):
    make_config, variant = TORCHAO[name]
    m = quantize(plain_linear(), make_config())
    x = torch.randn(2, 7, K, dtype=torch.bfloat16)
    with torch.no_grad():
        eager = m(x)
        y = compile_zen(m)(x)
    ref = reference_output(x, m[0].weight.dequantize(), m[0].bias)
    assert zen_inductor.counters["dequant_matmul"] == 1
    if variant:  # a 256-wide group on K=256 is per-channel by another name
        assert zen_inductor.counters[f"dequant_matmul.{variant}"] == 1
    assert sqnr(y, ref) >= 40
    # eager multiplies by exactly the bf16 weights the reference holds; a fused kernel rounds
    # elsewhere, so it is held to the absolute bar and to within a few dB of eager
    assert sqnr(y, ref) >= sqnr(eager, ref) - 6.0
    assert "zen.quant_linear" in zen_inductor.last_report()["matches"][0]["replacement"]


def test_fp32_activations_and_dynamic_rows():
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    m = quantize(plain_linear(dtype=torch.float32), IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64)))
    compiled = compile_zen(m)
    w = m[0].weight.dequantize()
    with torch.no_grad():
        for rows in (1, 5, 33, 300):  # decode and prefill sizes through one graph
            x = torch.randn(rows, K)
            assert sqnr(compiled(x), reference_output(x, w, m[0].bias)) >= 40
    assert zen_inductor.counters["dequant_matmul.int4_sym_group64"] >= 1


def test_dynamic_batch_and_sequence():
    """Both leading dims symbolic: the activation's view takes SymInt sizes as graph inputs."""
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    m = quantize(plain_linear(), IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64)))
    compiled = torch.compile(m, backend="zen", dynamic=True)
    w = m[0].weight.dequantize()
    with torch.no_grad():
        for shape in ((2, 7), (1, 1), (3, 5)):
            x = torch.randn(*shape, K, dtype=torch.bfloat16)
            assert sqnr(compiled(x), reference_output(x, w, m[0].bias)) >= 40
    assert zen_inductor.counters["dequant_matmul.int4_sym_group64"] >= 1




@pytest.mark.parametrize(
    "group,zero_point,bits,bias,variant",
    [
        (None, False, 8, False, "int8_sym_per_channel"),
        (None, True, 4, True, "int4_asym_per_channel"),
        (32, False, 4, False, "int4_sym_group32"),
        (128, True, 4, True, "int4_asym_group128"),
    ],
)
def test_hand_written_dequant(group, zero_point, bits, bias, variant):
    torch.manual_seed(1)
    m = HandDequant(group, zero_point, bits, bias).eval()
    x = torch.randn(3, 4, K, dtype=torch.bfloat16)
    with torch.no_grad():
        y = compile_zen(m)(x)
    assert zen_inductor.counters[f"dequant_matmul.{variant}"] == 1
    assert sqnr(y, reference_output(x, m.reference_weight(), m.bias)) >= 40


class OtherSpelling(HandDequant):
    """The same dequant written another way: codes on the right of a sub, a neg, scale first."""

    def weight(self):
        q = self.q.view(N, K // self.group, self.group).to(torch.bfloat16)
        return (self.scale * -(self.zp - q)).view(N, K)


def test_another_spelling_reads_the_same_weight():
    torch.manual_seed(1)
    m = OtherSpelling(64, True, 4).eval()
    x = torch.randn(3, K, dtype=torch.bfloat16)
    with torch.no_grad():
        y = compile_zen(m)(x)
    assert zen_inductor.counters["dequant_matmul.int4_asym_group64"] == 1
    assert sqnr(y, reference_output(x, m.reference_weight(), None)) >= 40


def test_the_probe_is_updated_in_place_only_where_that_computes_the_same():
    from zen_inductor.weight_reading import _in_place

    aten = torch.ops.aten
    v, s = torch.randn(4, 3, 8), torch.randn(4, 3, 1)
    expected = v * s
    assert _in_place(aten.mul.Tensor, v, (s, v), {}) is v and torch.equal(v, expected)  # commutative: either side
    w = torch.randn(4, 3, 8)
    assert _in_place(aten.sub.Tensor, w, (s, w), {}) is None  # s - w is not w -= s
    assert _in_place(aten.add.Tensor, s, (s, w), {}) is None  # the result is larger than s
    assert _in_place(aten.add.Tensor, w, (w, s), {"alpha": 2}) is None
    expanded = torch.randn(4, 1, 8).expand(4, 3, 8)  # one element seen three times
    assert _in_place(aten.mul.Tensor, expanded, (expanded, 2.0), {}) is None
    assert _in_place(aten.mul.Tensor, w.bfloat16(), (w.bfloat16(), 2.0), {}) is None  # only fp32 probes


def test_a_reading_holds_its_codes_and_one_scale_and_offset_a_group():
    # a compile holds every reading until its weights are packed: scales kept as views of the
    # probes' full-size fp32 tensors held 8 bytes a weight (1.1 GB for SmolLM2-135M)
    from zen_inductor.weight_reading import describe_quantized

    n, k, g = 16, 256, 32
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    scale = torch.rand(n, k // g).repeat_interleave(g, dim=1)
    offset = torch.randn(n, k // g).repeat_interleave(g, dim=1)
    w = describe_quantized(q, scale, offset, g)
    assert w.group_size == g
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (w.codes, w.scale, w.offset)}
    assert sum(held.values()) == n * k + 2 * n * (k // g) * 4
    assert torch.equal(w.dequantize(), q.float() * scale + offset)


@settings(max_examples=40, derandomize=True, deadline=None)
@given(st.integers(1, 3), st.sampled_from([8, 16, 24, 32, 48, 64, 96, 128]), st.integers(1, 12), st.data())
def test_the_group_is_the_largest_run_along_k_in_which_scale_and_offset_stay_constant(n, g, groups, data):
    """Against trying every divisor of K: groups that happen to repeat their neighbour's value
    (a larger group then holds), offsets broadcast along K, and a hint that is or is not a group."""
    from zen_inductor.weight_reading import group_size

    k = g * groups
    pick = st.lists(st.sampled_from([0.25, 1.0]), min_size=n * groups, max_size=n * groups)
    scale = torch.tensor(data.draw(pick)).view(n, groups).repeat_interleave(g, dim=1)
    offset = (torch.tensor(data.draw(pick)).view(n, groups).repeat_interleave(g, dim=1) if data.draw(st.booleans())
              else torch.zeros(n, 1).expand(n, k))

    def constant_in(t, size):
        blocks = t.reshape(n, k // size, size)
        return bool((blocks == blocks[..., :1]).all())

    largest = max(d for d in range(1, k + 1) if k % d == 0 and constant_in(scale, d) and constant_in(offset, d))
    assert largest % g == 0
    hint = data.draw(st.sampled_from([g, k, 8]))
    assert group_size(scale, offset, hint) == (hint if largest % hint == 0 else largest)


def test_a_nan_scale_is_a_miss_that_says_so():
    from zen_inductor.record import PatternMiss
    from zen_inductor.weight_reading import describe_quantized

    scale = torch.ones(4, 64)
    scale[2, 5] = float("nan")
    with pytest.raises(PatternMiss, match="NaN"):
        describe_quantized(torch.zeros(4, 64, dtype=torch.int8), scale, torch.zeros(4, 64), 32)


@pytest.mark.parametrize("zero_point", [True, False])
def test_symmetric_codes_are_read_with_one_full_size_probe_held(monkeypatch, zero_point):
    """Where the chain gives 0 for code 0 everywhere (symmetric codes) its value at code 1 is the
    scale: the zeros probe's result is let go before the ones probe is evaluated, so reading a
    weight holds 4 bytes a weight of fp32 temporaries at a time, not 8."""
    from torch.multiprocessing.reductions import StorageWeakRef

    from zen_inductor import weight_reading

    along, results, held = weight_reading._along_path, [], []

    def recording(ctx, codes, path, value, affine):
        if affine:
            held.append(sum(not r.expired() for r in results))
        out = along(ctx, codes, path, value, affine)
        if affine:
            results.append(StorageWeakRef(out.untyped_storage()))
        return out

    monkeypatch.setattr(weight_reading, "_along_path", recording)
    torch.manual_seed(1)
    m = HandDequant(32, zero_point, 4).eval()
    x = torch.randn(3, K, dtype=torch.bfloat16)
    with torch.no_grad():
        y = compile_zen(m)(x)
    assert len(held) >= 2 and set(held[1::2]) == {1 if zero_point else 0}, held  # at each ones probe
    assert sqnr(y, reference_output(x, m.reference_weight(), None)) >= 40


@pytest.mark.parametrize("zero_point", [True, False])
def test_gptq_packed_int4(zero_point):
    torch.manual_seed(2)
    m = GPTQPacked(64, zero_point).eval()
    x = torch.randn(5, K, dtype=torch.bfloat16)
    with torch.no_grad():
        y = compile_zen(m)(x)
    assert zen_inductor.counters["dequant_matmul.int4_" + ("asym" if zero_point else "sym") + "_group64"] == 1
    assert sqnr(y, reference_output(x, m.reference_weight(), None)) >= 40


def test_outlier_heavy_weights():
    torch.manual_seed(3)
    m = HandDequant(64, True, 4).eval()
    m.scale[::17] *= 40  # a few groups with huge scales, as outlier channels give
    x = torch.randn(8, K, dtype=torch.bfloat16)
    x[:, ::31] *= 20
    with torch.no_grad():
        y = compile_zen(m)(x)
    assert zen_inductor.counters["dequant_matmul"] == 1
    assert sqnr(y, reference_output(x, m.reference_weight(), None)) >= 40


# --- bad input: left to Inductor, reported, never wrong ------------------------------------------


def _only_near_miss():
    report = zen_inductor.last_report()
    assert report["matches"] == []
    assert len(report["near_misses"]) == 1
    return report["near_misses"][0]["reason"]


def test_group_size_without_kernel_is_a_near_miss():
    torch.manual_seed(4)
    m = HandDequant(48, True, 4).eval()  # 48 divides 240, not 256: use K=240 below
    m.group = 48
    m.q = torch.randint(-8, 8, (N, 240), dtype=torch.int8)
    m.scale = torch.rand(N, 5, 1).to(torch.bfloat16)
    m.zp = torch.zeros(N, 5, 1, dtype=torch.bfloat16)
    m.weight = lambda: ((m.q.view(N, 5, 48).to(torch.bfloat16) - m.zp) * m.scale).view(N, 240)
    x = torch.randn(3, 240, dtype=torch.bfloat16)
    # zentorch's WOQ GEMM takes any group dividing K (on CPUs with AVX512-BF16): left out here
    with torch.no_grad(), config.patch(kernel_deny=("zentorch_woq_linear",)):
        y = compile_zen(m)(x)
    reason = _only_near_miss()
    assert "group size 48" in reason and "left to Inductor" in reason
    ref = x.float() @ ((m.q.view(N, 5, 48).float()) * m.scale.float()).view(N, 240).t()
    assert sqnr(y, ref) >= 40


@pytest.mark.skipif(zentorch_unavailable() is not None, reason="zentorch's WOQ GEMM is the only kernel for group 48")
def test_group_size_only_zentorch_takes_is_matched_and_right():
    torch.manual_seed(4)
    m = HandDequant(48, True, 4).eval()
    m.q = torch.randint(-8, 8, (N, 240), dtype=torch.int8)
    m.scale = torch.rand(N, 5, 1).to(torch.bfloat16)
    m.weight = lambda: (m.q.view(N, 5, 48).to(torch.bfloat16) * m.scale).view(N, 240)
    x = torch.randn(3, 240, dtype=torch.bfloat16)
    with torch.no_grad():
        y = compile_zen(m)(x)
    (match,) = zen_inductor.last_report()["matches"]
    assert match["variant"] == "int4_sym_group48"
    assert {b["winner"] for b in zen_inductor.last_report()["autotune"][0]["bins"]} <= {"zentorch_woq_linear", "zentorch_linear_dequantized",
                                                                                      "aten_linear_dequantized", "dequant_sgemm"}
    ref = x.float() @ (m.q.view(N, 5, 48).float() * m.scale.float()).view(N, 240).t()
    assert sqnr(y, ref) >= 40


def test_fp16_activations_are_a_near_miss():
    m = HandDequant(64, True, 4).half().eval()
    m.weight = lambda: ((m.q.view(N, K // 64, 64).half() - m.zp) * m.scale).view(N, K)
    x = torch.randn(3, K, dtype=torch.float16)
    with torch.no_grad():
        y = compile_zen(m)(x)
    assert "float16 activations" in _only_near_miss()
    assert sqnr(y, reference_output(x.float(), m.reference_weight(), None)) >= 30


def test_codes_wider_than_8_bits_are_a_near_miss():
    class Wide(HandDequant):
        def weight(self):
            return (self.q.to(torch.int32) * 300).to(torch.bfloat16) * self.scale.view(N, 1) * 1e-3

    m = Wide(None, False, 8).eval()
    x = torch.randn(2, K, dtype=torch.bfloat16)
    with torch.no_grad():
        compile_zen(m)(x)
    assert "wider than 8 bits" in _only_near_miss()


def test_a_chain_not_affine_in_the_codes_is_a_near_miss():
    """Only dequant ops, each taking the codes once, yet a code is the divisor: the probes alone
    would read a scale and offset; the chain run on the real codes disproves them."""
    class Reciprocal(HandDequant):
        def weight(self):
            q = self.q.view(N, K // self.group, self.group).to(torch.bfloat16)
            return (self.scale / (q + 10)).view(N, K)

    m = Reciprocal(64, False, 4).eval()
    x = torch.randn(2, K, dtype=torch.bfloat16)
    with torch.no_grad():
        y = compile_zen(m)(x)
    assert "not affine in the integer codes" in _only_near_miss()
    assert sqnr(y, x.float() @ m.weight().float().t()) >= 40


def test_grad_mode_leaves_weights_to_inductor_with_a_warning():
    m = HandDequant(64, True, 4).eval()
    x = torch.randn(2, K, dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="grad mode is on"):
        y = compile_zen(m)(x)
    assert "not a constant" in _only_near_miss()
    assert sqnr(y.detach(), reference_output(x, m.reference_weight(), None)) >= 40


def test_without_zentorch_the_aten_candidates_serve(monkeypatch):
    m = HandDequant(64, False, 4).eval()
    x = torch.randn(2, K, dtype=torch.bfloat16)
    with config.patch(use_zentorch=False), torch.no_grad():
        y = compile_zen(m)(x)
    tuned = zen_inductor.last_report()["autotune"][0]
    assert "disabled by config.use_zentorch" in tuned["excluded"]["zentorch_woq_linear"]
    chosen = set(zen_inductor.last_report()["matches"][0]["kernels"].values())
    assert chosen and all(KERNELS[name].source != "zentorch" and "zentorch" not in name for name in chosen)
    assert sqnr(y, reference_output(x, m.reference_weight(), None)) >= 40


def test_a_fast_wrong_kernel_never_wins(monkeypatch):
    def wrong_run(x, packed, bias, spec):
        return torch.zeros(x.shape[0], spec.n, dtype=x.dtype)  # instant, and wrong

    wrong = Kernel("fast_but_wrong", "test", lambda spec: None, lambda w, dt: [], wrong_run)
    monkeypatch.setitem(KERNELS, "fast_but_wrong", wrong)
    m = HandDequant(64, True, 4).eval()
    x = torch.randn(4, K, dtype=torch.bfloat16)
    with torch.no_grad():
        y = compile_zen(m)(x)
    report = zen_inductor.last_report()
    assert "fast_but_wrong" not in report["matches"][0]["kernels"].values()
    for b in report["autotune"][0]["bins"]:
        assert "SQNR" in b["excluded"]["fast_but_wrong"]
    assert sqnr(y, reference_output(x, m.reference_weight(), None)) >= 40


# --- dynamic int8 activations, and ATen's packed int4 op -----------------------------------------


def test_int8_dynamic_activation_int8_weight():
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    m = quantize(plain_linear(), Int8DynamicActivationInt8WeightConfig())
    x = torch.randn(2, 9, K, dtype=torch.bfloat16)
    with torch.no_grad():
        y = compile_zen(m)(x)
    assert zen_inductor.counters["dequant_matmul.da8w8_per_channel"] == 1
    assert sqnr(y, reference_output(x, m[0].weight.dequantize(), m[0].bias)) >= 30
    # the activation quantization went with the span it replaced
    report = zen_inductor.last_report()
    assert report["autotune"][0]["kind"].startswith("da8_")


def test_int8_dynamic_activation_u8s8_form(monkeypatch, dumped):
    """The form torchao emits on CPUs with VNNI but no AMX: x + 128 as u8, then compensation."""
    import torchao.kernel.intmm as intmm
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    monkeypatch.setattr(intmm, "_cpu_is_vnni_supported", lambda: True)
    monkeypatch.setattr(intmm, "_cpu_is_amx_tile_supported", lambda: False)
    m = quantize(plain_linear(), Int8DynamicActivationInt8WeightConfig())
    x = torch.randn(2, 9, K, dtype=torch.bfloat16)
    with torch.no_grad():
        eager = m(x)
        y = compile_zen(m)(x)
    before = dumped("before.py")
    assert "torch.uint8" in before and "aten.sub.Tensor" in before  # really the u8s8 form
    assert zen_inductor.counters["dequant_matmul.da8w8_per_channel"] == 1
    ref = reference_output(x, m[0].weight.dequantize(), m[0].bias)
    assert sqnr(y, ref) >= 30
    assert sqnr(y, ref) >= sqnr(eager, ref) - 3.0


@pytest.mark.parametrize("name", ["aten_int_mm_da8", "zen_a8w8_gemm_avx2"])
def test_da8_kernel_alone_meets_its_bar(name):
    """Each int8 x int8 GEMM itself, without weight-only kernels to fall back on; _int_mm only
    where oneDNN's sums are exact (VNNI), our exact AVX2 GEMM wherever AVX2 is."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig
    from zen_inductor.kernels import LinearSpec

    why = KERNELS[name].supports(LinearSpec(N, K, K, 8, True, torch.bfloat16, dynamic_activation=True))
    if why is not None:
        assert name == "aten_int_mm_da8" and "saturates" in why  # an AVX2-only CPU (or one capped)
        pytest.skip(why)
    m = quantize(plain_linear(), Int8DynamicActivationInt8WeightConfig())
    x = torch.randn(6, K, dtype=torch.bfloat16)
    with config.patch(kernel_allow=(name,)), torch.no_grad():
        y = compile_zen(m)(x)
    assert set(zen_inductor.last_report()["matches"][0]["kernels"].values()) == {name}
    assert sqnr(y, reference_output(x, m[0].weight.dequantize(), m[0].bias)) >= 30


def test_model_activation_quantization_keeps_the_models_grid():
    """By default kernels that take the activations as given compete for an int8 dynamic linear,
    and the report says what each bin's kernel does to them; with the flag only kernels that
    quantize them as the model does (int8 per row) run, and the result is eager's within rounding."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    m = quantize(plain_linear(), Int8DynamicActivationInt8WeightConfig())
    x = torch.randn(1, 5, K, dtype=torch.bfloat16)
    with torch.no_grad():
        eager = m(x)
        compile_zen(m)(x)
    bins = zen_inductor.last_report()["autotune"][0]["bins"]
    assert all(b["activations"].endswith("(the model: int8 per row)") for b in bins)
    torch._dynamo.reset()
    with config.patch(model_activation_quantization=True), torch.no_grad():
        y = compile_zen(m)(x)
    report = zen_inductor.last_report()["autotune"][0]
    assert {b["activations"] for b in report["bins"]} == {"int8 per row (the model: int8 per row)"}
    assert "config.model_activation_quantization" in report["excluded"]["zen_w8_avx2"]
    assert sqnr(y, eager) >= 40  # the same grid: only rounding apart


@pytest.mark.parametrize("group", [32, 128])
def test_prototype_int4_weight_only(group):
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

    m = quantize(plain_linear(), PrototypeInt4WeightOnlyConfig(group_size=group))
    x = torch.randn(3, 5, K, dtype=torch.bfloat16)
    with torch.no_grad():
        eager = m(x)
        y = compile_zen(m)(x)
    assert zen_inductor.counters["dequant_matmul"] == 1
    variant = next(k for k in zen_inductor.counters if k.startswith("dequant_matmul.int4pack_"))
    assert variant.endswith(f"group{group}")
    assert sqnr(y, eager) >= 40
