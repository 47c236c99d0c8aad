"""linear_epilogue: silu(gate) * up computed in the kernel of the merged gate/up linear."""
import dataclasses

import pytest
import torch

import zen_inductor
from zen_inductor import native, verification
from zen_inductor.kernels import DenseWeight, LinearSpec, QuantWeight, run_kernel, swiglu_row_order

from conftest import any_rows, compile_zen, eager_and_zen, quantize, sqnr
from quantized import every_kernel_packed, fp32_weight, fuses_swiglu, quant_linear_calls, quant_weight

K, I = 256, 96  # I: a multiple of 8, not of 16 (gate and up tiles pair up inside one block of 16)




def _swiglu_reference(x, w_gate_up, bias):
    """fp32: both halves, then silu(gate) * up, the way the model computes it unfused."""
    y = x.float() @ w_gate_up.float().t() + (bias.float() if bias is not None else 0)
    gate, up = y.split(y.shape[1] // 2, dim=1)
    return torch.nn.functional.silu(gate) * up


def _interleaved(w, rows):
    if isinstance(w, DenseWeight):
        return DenseWeight(w.weight[rows].contiguous())
    return QuantWeight(w.codes[rows], w.scale[rows], w.offset[rows], None, w.group_size, w.bits)


@pytest.mark.skipif(native.unavailable("woq_avx2") is not None, reason="needs AVX2 and a C++ compiler")
@pytest.mark.parametrize("fmt", ["int4", "int8", "bf16", "da8w4"])
def test_every_candidate_computes_the_epilogue(fmt):
    """Native kernels fuse it, the others get it applied after them; all against fp32."""
    if fmt == "bf16":
        plain = DenseWeight((torch.randn(2 * I, K) * 0.05).to(torch.bfloat16))
        spec = LinearSpec(n=2 * I, k=K, group_size=K, bits=16, symmetric=True, act_dtype=torch.bfloat16)
        reference_w = plain.weight
    else:
        plain = quant_weight(2 * I, K, 8 if fmt == "int8" else 4, 128)
        spec = LinearSpec(n=2 * I, k=K, group_size=128, bits=plain.bits, symmetric=False, act_dtype=torch.bfloat16,
                          dynamic_activation=fmt == "da8w4")
        reference_w = plain.dequantize()
    spec = dataclasses.replace(spec, epilogue="swiglu")
    rows = swiglu_row_order(I)
    weight = _interleaved(plain, rows)
    packed_kernels = every_kernel_packed(spec, weight)
    fused = [k.name for k, _ in packed_kernels if "swiglu" in k.epilogues]
    assert fused and len(fused) < len(packed_kernels)  # both kinds are exercised
    bias = torch.randn(2 * I).to(torch.bfloat16)
    for kernel, packed in packed_kernels:
        for m in (1, 5, 33):
            x = torch.randn(m, K).to(torch.bfloat16)
            for b in (None, bias):
                y = run_kernel(kernel, x, packed, None if b is None else b[rows], spec)
                assert y.shape == (m, I) and y.dtype == torch.bfloat16
                bar = 30 if spec.dynamic_activation else 40
                assert sqnr(y, _swiglu_reference(x, reference_w, b)) >= bar, (kernel.name, m, b is not None)


@pytest.mark.skipif(native.unavailable("swiglu_avx2") is not None, reason="needs AVX2 and a C++ compiler")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_applied_epilogue_is_one_native_pass_that_agrees_with_aten(dtype):
    """After a kernel that does not fuse it (zentorch's), silu(gate) * up is our C++ pass; ATen
    ops compute the same where native kernels are off, and for the verifier's reference."""
    from zen_inductor import config
    from zen_inductor.kernels import apply_epilogue, epilogue_reference

    spec = LinearSpec(n=2 * I, k=K, group_size=K, bits=16, symmetric=True, act_dtype=dtype, epilogue="swiglu")
    rows = swiglu_row_order(I)
    for m in (0, 1, 7, 128):
        plain = torch.randn(m, 2 * I) * 4
        y = plain[:, rows].to(dtype)  # the merged kernel's column order: gate and up blocks of 8 in turn
        gate, up = plain.to(dtype).float().split(I, dim=1)
        reference = torch.nn.functional.silu(gate) * up
        native_out, aten_out = apply_epilogue(y, spec), epilogue_reference(y, spec)
        with config.patch(native_kernels=False):
            assert torch.equal(apply_epilogue(y, spec), aten_out)
        assert native_out.shape == aten_out.shape == (m, I) and native_out.dtype == dtype
        if m:
            torch.testing.assert_close(native_out.float(), aten_out.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                                       atol=1e-5)
            assert sqnr(native_out, reference) >= (40 if dtype == torch.bfloat16 else 100)


class MLP(torch.nn.Module):
    """A Llama MLP: down(silu(gate(x)) * up(x)); optionally also returning gate(x)."""

    def __init__(self, also_return_gate=False, width=192):
        super().__init__()
        self.gate = torch.nn.Linear(K, width, bias=False)
        self.up = torch.nn.Linear(K, width, bias=False)
        self.down = torch.nn.Linear(width, K, bias=False)
        self.also_return_gate = also_return_gate

    def forward(self, x):
        g = self.gate(x)
        y = self.down(torch.nn.functional.silu(g) * self.up(x))
        return (y, g) if self.also_return_gate else y


def _int4_mlp(**kw):
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    torch.manual_seed(0)
    return quantize(MLP(**kw).to(torch.bfloat16).eval(), IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64)))


def _fp32_reference(model, x):
    with torch.no_grad():
        w = {name: fp32_weight(getattr(model, name).weight) for name in ("gate", "up", "down")}
        xf = x.float()
        return (torch.nn.functional.silu(xf @ w["gate"].t()) * (xf @ w["up"].t())) @ w["down"].t()


def test_swiglu_is_fused_into_the_merged_linear(tmp_path):
    model = _int4_mlp()
    x = torch.randn(2, 7, K).to(torch.bfloat16)
    with torch.no_grad(), zen_inductor.config.patch(debug_dir=str(tmp_path)):
        eager = model(x)
        zen = compile_zen(model)(x)
    assert zen_inductor.counters["linear_epilogue.swiglu"] == 1
    assert zen_inductor.counters["concat_linear"] == 1
    report = zen_inductor.last_report()
    (match,) = [m for m in report["matches"] if m["pattern"] == "linear_epilogue"]
    assert "test_linear_epilogue.py" in match["source"] and match["kernels"]
    with open(tmp_path / "LATEST") as f, open(f.read().strip() + "/after.py") as g:
        after = g.read()
    # the dumped graph: one merged linear with the epilogue in its plan (or its direct call's
    # swiglu flag), no split, no silu ops
    calls = quant_linear_calls(after)  # gate/up merged, and down
    assert len(calls) == 2 and any(fuses_swiglu(c) for c in calls), calls
    for op in ("split_with_sizes", "aten.exp", "aten.neg", "aten.div", "aten.sigmoid", "aten.silu"):
        assert op not in after, op
    ref = _fp32_reference(model, x)
    assert zen.shape == eager.shape
    assert sqnr(zen, ref) >= sqnr(eager, ref) - 0.5


def test_a_merged_weight_is_held_only_until_it_is_packed(monkeypatch):
    """concat's merged weight and swiglu's reordered rows are copies of the codes, a byte a
    weight: held from one linear's packing to the end of the compile they were an 8B model's
    gate/up codes twice over (7.5 GB). When the second MLP's gate/up is tuned, no reading of the
    first one's merged shape may be alive, however plentiful memory is."""
    import gc

    WIDTH = 192

    from zen_inductor import allocator, autotune

    total_kb = 24 << 20
    monkeypatch.setattr(allocator, "_meminfo_kb", lambda: {"MemTotal": total_kb, "MemAvailable": total_kb})
    plan, alive = autotune.Tuner.plan, []

    def counting_plan(self, spec, weight, bias, ahead=0, *rest):
        if spec.n == 2 * WIDTH:
            gc.collect()
            merged = [o for o in gc.get_objects() if isinstance(o, QuantWeight) and o.codes.shape[0] == 2 * WIDTH]
            alive.append(sum(o.codes.untyped_storage().data_ptr() != weight.codes.untyped_storage().data_ptr() for o in merged))
        return plan(self, spec, weight, bias, ahead, *rest)

    monkeypatch.setattr(autotune.Tuner, "plan", counting_plan)
    model = torch.nn.Sequential(_int4_mlp(width=WIDTH), _int4_mlp(width=WIDTH))
    x = any_rows(torch.randn(3, K).to(torch.bfloat16))
    with torch.no_grad():
        zen = compile_zen(model)(x)
    assert zen_inductor.counters["linear_epilogue.swiglu"] == 2
    assert len(alive) == 2 and alive[1] <= 1, alive  # the merged rows the reordered ones were made of, at most
    assert sqnr(zen, model(x)) >= 30


def test_swiglu_with_dynamic_batch_and_sequence():
    model = _int4_mlp()
    fast = torch.compile(model, backend="zen", dynamic=True)
    with torch.no_grad():
        for shape in ((1, 1, K), (2, 9, K), (1, 70, K)):
            # four inputs a shape: one token's 256 outputs are too few for a stable SQNR (a single
            # bf16 ulp moved it by 1.5 dB, and eager's varied 45-49 dB from token to token)
            xs = [torch.randn(*shape).to(torch.bfloat16) for _ in range(4)]
            ref = torch.cat([_fp32_reference(model, x) for x in xs])
            zen, eager = torch.cat([fast(x) for x in xs]), torch.cat([model(x) for x in xs])
            assert sqnr(zen, ref) >= sqnr(eager, ref) - 0.5, shape
    assert zen_inductor.counters["linear_epilogue.swiglu"] >= 1
    assert zen_inductor.counters["linear_epilogue.near_miss"] == 0


class ResidualMLP(MLP):
    def forward(self, x):
        return x + super().forward(x)


def test_int8_dynamic_mlp_gets_the_epilogue_and_the_residual_fold(dumped):
    """torchao's int8 dynamic span ends in fp32 and the model converts it back to bf16: the
    families after dequant_matmul see the linear through that exact round trip."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    torch.manual_seed(0)
    model = quantize(ResidualMLP().to(torch.bfloat16).eval(), Int8DynamicActivationInt8WeightConfig())
    x = torch.randn(1, 3, K).to(torch.bfloat16)
    eager, zen = eager_and_zen(model, x)
    assert zen_inductor.counters["linear_epilogue.swiglu"] == 1
    assert zen_inductor.counters["residual_add"] == 1
    after = dumped("after.py")
    assert any(fuses_swiglu(c) for c in quant_linear_calls(after)) and "residual = " in after
    for op in ("split_with_sizes", "aten.exp", "prims.convert_element_type.default(quant_linear"):
        assert op not in after, op
    ref = x.float() + _fp32_reference(model, x)
    assert sqnr(zen, ref) >= sqnr(eager, ref) - 0.5


def test_int8_dynamic_gate_and_up_are_read_from_the_models_own_rows():
    """Merged and reordered for the epilogue, an int8 dynamic gate/up needs no copy of its rows:
    the kernels of the own-rows layout read gate's and up's int8 tensors where the model keeps
    them (a merged copy was 537 MB of a 1B model after compiling). Every int8 tensor the plans
    keep is one of the model's."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    torch.manual_seed(0)
    model = quantize(MLP().to(torch.bfloat16).eval(), Int8DynamicActivationInt8WeightConfig())
    x = any_rows(torch.randn(5, K).to(torch.bfloat16))
    own_layout = ("aten_int_mm_da8", "zen_a8w8_gemm_avx2", "zen_a8w8_rows_avx2", "zen_a8w8_rows_avx512")
    with zen_inductor.config.patch(kernel_allow=own_layout), torch.no_grad():
        eager, zen = model(x), compile_zen(model)(x)
    assert zen_inductor.counters["linear_epilogue.swiglu"] == 1 and zen_inductor.counters["concat_linear"] == 1
    assert sqnr(zen, eager) >= 30
    rows = [getattr(model, name).weight.qdata for name in ("gate", "up", "down")]
    tunings = [t for w in rows for key, t in w.__dict__.get("_zen_memo", {}).items() if key[0][0] == "tune"]
    assert {t.plan.spec.n for t in tunings} == {2 * 192, K}  # gate/up merged, and down
    kept = [p for t in tunings for name in t.plan.kernels for p in t.packed[name] if p.dtype == torch.int8 and p.numel()]
    assert kept and {p.untyped_storage().data_ptr() for p in kept} <= {w.untyped_storage().data_ptr() for w in rows}


def test_gate_used_elsewhere_is_a_near_miss_and_stays_correct():
    model = _int4_mlp(also_return_gate=True)
    x = any_rows(torch.randn(3, K).to(torch.bfloat16))
    with torch.no_grad():
        eager_y, eager_g = model(x)
        zen_y, zen_g = compile_zen(model)(x)
    assert zen_inductor.counters["linear_epilogue"] == 0
    (miss,) = [n for n in zen_inductor.last_report()["near_misses"] if n["pattern"] == "linear_epilogue"]
    assert "also used outside silu(gate) * up" in miss["reason"]
    ref = _fp32_reference(model, x)
    assert sqnr(zen_y, ref) >= sqnr(eager_y, ref) - 0.5
    assert sqnr(zen_g, eager_g) >= 40


def test_no_verified_kernel_falls_back_to_a_gemm_with_the_epilogue_as_graph_ops(monkeypatch):
    monkeypatch.setattr(verification, "SQNR_WEIGHT_ONLY_DB", 1000.0)  # every candidate fails verification
    model = _int4_mlp()
    x = torch.randn(4, K).to(torch.bfloat16)
    with torch.no_grad():
        eager = model(x)
        zen = compile_zen(model)(x)
    report = zen_inductor.last_report()
    assert zen_inductor.counters["linear_epilogue"] == 0  # taken back
    assert any("runs as a GEMM on the dequantized weight" in n["reason"] for n in report["near_misses"])
    ref = _fp32_reference(model, x)
    assert sqnr(zen, ref) >= sqnr(eager, ref) - 0.5
