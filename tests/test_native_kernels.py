"""Our C++ kernels: int8 x int4, weight-only int4 and int8, bf16 GEMV, dequantize + sgemm; torchao DA8W4; fallbacks."""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import zen_inductor
from zen_inductor import config, native
from zen_inductor.kernels import KERNELS, LinearSpec, QuantWeight, apply_epilogue, candidates, run_kernel, swiglu_row_order
from zen_inductor.cpu import zentorch_unavailable

from conftest import compile_zen, quantize, sqnr
from quantized import HandDequant, a8w4_spec, int4_weight

K, N = 512, 192
A8W4 = KERNELS["zen_a8w4_avx2"]






def _needs(library, what):
    return pytest.mark.skipif(native.unavailable(library) is not None, reason=f"needs {what} and a C++ compiler")


@pytest.mark.skipif(native.unavailable("a8w4_avx2") is not None, reason="needs AVX2 and a C++ compiler")
@pytest.mark.parametrize("group", [64, 128, 256, 512])
@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float32])
def test_kernel_against_fp32_reference(group, act_dtype):
    torch.manual_seed(0)
    n, k = 264, 1024  # N not a multiple of the 64-row blocks other kernels use; big groups are split
    for outliers in (False, True):
        w = int4_weight(n, k, group, outliers)
        spec = a8w4_spec(w, act_dtype)
        packed = A8W4.prepack(w, act_dtype)
        bias = torch.randn(n).to(act_dtype)
        for m, loud_channel in ((1, False), (5, True), (64, False), (64, True)):
            x = torch.randn(m, k).to(act_dtype)
            if loud_channel:  # an activation outlier channel coarsens its group's int8 grid
                x[:, 7] *= 30
            for b in (None, bias):
                y = run_kernel(A8W4, x, packed, b, spec)
                ref = x.float() @ w.dequantize().t() + (b.float() if b is not None else 0)
                assert y.dtype == act_dtype and y.shape == (m, n)
                # the dynamic-activation bar always; with ordinary weights and activations
                # per-group int8 keeps the kernel above even the weight-only bar
                assert sqnr(y, ref) >= (30 if loud_channel or outliers else 40), (group, outliers, m, b is not None)
    # rows of x that are not contiguous (a strided view) are read right
    x = torch.randn(k, 3).to(act_dtype).t()
    ref = x.float() @ w.dequantize().t()
    assert sqnr(run_kernel(A8W4, x, packed, None, spec), ref) >= 40


def test_kernel_constraints_are_reasons():
    w = int4_weight(N, K, 128)
    assert A8W4.supports(a8w4_spec(w, torch.bfloat16)) is None and A8W4.native == "a8w4_avx2"
    assert "multiples of 64" in A8W4.supports(a8w4_spec(int4_weight(N, K, 32), torch.bfloat16))
    assert "not a multiple of 8" in A8W4.supports(a8w4_spec(int4_weight(100, K, 128), torch.bfloat16))
    assert A8W4.supports(a8w4_spec(w, torch.float16)) == "torch.float16 activations"
    assert A8W4.supports(a8w4_spec(w, torch.bfloat16, dynamic=False)).startswith("not for weight-only")
    with config.patch(native_kernels=False):  # the library's availability is candidates()' to check
        assert "disabled" in candidates(a8w4_spec(w, torch.bfloat16))[1]["zen_a8w4_avx2"]


def _da8w4(group=128, mapping="SYMMETRIC", bias=True):
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(K, N, bias=bias)).to(torch.bfloat16).eval()
    cfg = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group),
                                                weight_mapping_type=getattr(MappingType, mapping))
    return quantize(m, cfg)


def reference_output(m, x):
    y = x.float() @ m[0].weight.dequantize().float().t()
    return y + m[0].bias.float() if m[0].bias is not None else y


@pytest.mark.skipif(native.unavailable("a8w4_avx2") is not None, reason="needs AVX2 and a C++ compiler")
@pytest.mark.parametrize("mapping", ["SYMMETRIC", "ASYMMETRIC"])
def test_torchao_da8w4_runs_on_the_int8_int4_kernel(mapping, dumped):
    m = _da8w4(mapping=mapping)
    x = torch.randn(2, 7, K, dtype=torch.bfloat16)
    with config.patch(kernel_allow=("zen_a8w4_avx2",)), torch.no_grad():
        eager = m(x)
        compiled = compile_zen(m)
        y = compiled(x)
    sym = "sym" if mapping == "SYMMETRIC" else "asym"
    assert zen_inductor.counters[f"dequant_matmul.da8_int4_{sym}_group128"] == 1
    report = zen_inductor.last_report()
    assert set(report["matches"][0]["kernels"].values()) == {"zen_a8w4_avx2"}
    assert report["autotune"][0]["kind"].startswith("da8_int4")
    # torchao's activation fake-quant went with the span: the kernel quantizes x itself
    after = dumped("after.py")
    assert "zen.quant_linear" in after and "aten.round" not in after
    ref = reference_output(m, x)
    assert sqnr(y, ref) >= 30
    assert sqnr(y, ref) >= sqnr(eager, ref)  # per-group int8 is finer than torchao's per-row grid
    with torch.no_grad():
        y1 = compiled(x[:1, :1])  # a decode-sized call (Dynamo recompiles with a dynamic M)
    assert sqnr(y1, reference_output(m, x[:1, :1])) >= 30


@pytest.mark.parametrize("group,native_kernels,why", [(128, False, "disabled"), (32, True, "multiples of 64")])
def test_da8w4_without_the_native_kernel_stays_correct(group, native_kernels, why):
    """Switched off (or no compiler, no AVX2), or a group it does not take: the weight-only int4
    kernels serve the match, and the dumps say why."""
    m = _da8w4(group=group, bias=False)
    x = torch.randn(5, K, dtype=torch.bfloat16)
    with config.patch(native_kernels=native_kernels), torch.no_grad():
        y = compile_zen(m)(x)
    assert zen_inductor.counters[f"dequant_matmul.da8_int4_sym_group{group}"] == 1
    report = zen_inductor.last_report()
    assert "zen_a8w4_avx2" not in report["matches"][0]["kernels"].values()
    assert why in report["autotune"][0]["excluded"]["zen_a8w4_avx2"]
    assert sqnr(y, reference_output(m, x)) >= 30


def test_a_native_kernel_that_does_not_build_is_unavailable(monkeypatch):
    native._build.cache_clear()
    monkeypatch.setattr(native, "_BUILDS", {})  # builds started in this test only; the others come back after
    monkeypatch.setattr(native, "_source", lambda filename: "this is not C++;")
    try:
        reason = native.unavailable("a8w4_avx2")
        assert reason is not None and reason.startswith("could not build a8w4_avx2.cpp")
        w = int4_weight(N, K, 128)
        _, excluded = candidates(a8w4_spec(w, torch.bfloat16))
        assert excluded["zen_a8w4_avx2"] == reason
    finally:
        native._build.cache_clear()


_BUILDS_BEFORE_THE_ISA_CHECK = """
import itertools, threading
from zen_inductor import native
both_started, builds = threading.Barrier(2), itertools.count()
real = native._toolchain_checked
def checked():  # both builder threads busy before either asks for Inductor's ISA check
    if threading.current_thread().name.startswith("zen-build") and next(builds) < 2:
        both_started.wait(timeout=60)
    real()
native._toolchain_checked = checked
native.start("woq_avx2")
native.start("swiglu_avx2")
print([native.unavailable(name) for name in ("woq_avx2", "swiglu_avx2")])
"""


def test_builds_started_before_the_isa_check_finish():
    """Builds wait for Inductor's ISA check; run on the builders' own pool, the check queued behind
    two builds waiting for it and the process hung (benchmarks/linears.py, which starts builds
    without zen's entry, did)."""
    out = subprocess.run([sys.executable, "-c", _BUILDS_BEFORE_THE_ISA_CHECK], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str([native.unavailable("woq_avx2"), native.unavailable("swiglu_avx2")])


@pytest.mark.skipif(native.unavailable("a8w4_avx2") is not None, reason="needs AVX2 and a C++ compiler")
def test_weight_only_linears_may_opt_in_to_int8_activations():
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    torch.manual_seed(0)
    m = quantize(torch.nn.Sequential(torch.nn.Linear(K, N)).to(torch.bfloat16).eval(),
                 IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(128)))
    x = torch.randn(3, K, dtype=torch.bfloat16)
    with config.patch(kernel_allow=("zen_a8w4_avx2",)), torch.no_grad():
        compile_zen(m)(x)  # off by default: no kernel keeps the weight quantized, a near miss
    assert zen_inductor.counters["dequant_matmul"] == 0
    torch._dynamo.reset()
    with config.patch(kernel_allow=("zen_a8w4_avx2",), int8_activations_for_weight_only=True), torch.no_grad():
        y = compile_zen(m)(x)
    assert zen_inductor.counters["dequant_matmul.int4_sym_group128"] == 1
    assert set(zen_inductor.last_report()["matches"][0]["kernels"].values()) == {"zen_a8w4_avx2"}
    assert sqnr(y, reference_output(m, x)) >= 40  # held to the weight-only bar


@pytest.mark.parametrize("name", [
    pytest.param("zen_w4_avx512", marks=_needs("woq_avx512", "AVX512-VNNI")),
    pytest.param("zen_w8_avx512", marks=_needs("woq_avx512", "AVX512-VNNI")),
    pytest.param("zen_bf16_gemv_avx512", marks=_needs("bf16_gemv_avx512", "AVX512-BF16")),
    pytest.param("zen_bf16_rows_avx512", marks=_needs("bf16_gemv_avx512", "AVX512-BF16")),
    pytest.param("zen_w4_avx2", marks=_needs("woq_avx2", "AVX2")),
    pytest.param("zen_w8_avx2", marks=_needs("woq_avx2", "AVX2")),
    pytest.param("zen_a8w4_avx2", marks=_needs("a8w4_avx2", "AVX2")),
    pytest.param("zen_bf16_gemv_avx2", marks=_needs("bf16_gemv_avx2", "AVX2")),
    pytest.param("zen_bf16_blocks_avx2", marks=_needs("bf16_gemv_avx2", "AVX2")),
])
def test_native_kernels_add_the_residual_as_they_store(name):
    """``zen.quant_linear(..., residual=r)`` on a kernel that fuses it: r + x @ W^T in fp32, y never
    rounded to bf16 between (N = 72: the last 16-row block of the AVX-512 kernels half padding)."""
    from zen_inductor.kernels import DenseWeight, Plan, quant_linear

    torch.manual_seed(0)
    kernel = KERNELS[name]
    assert kernel.residual
    n, k = 72, 512
    if "bf16" in name:
        w = DenseWeight((torch.randn(n, k) * 0.05).to(torch.bfloat16))
        spec, ref_w = LinearSpec(n, k, k, 16, True, torch.bfloat16), w.weight.float()
    else:
        w = int4_weight(n, k, 128)
        if "_w8_" in name:
            w = dataclasses.replace(w, codes=torch.randint(-128, 128, (n, k), dtype=torch.int8), bits=8)
        spec = LinearSpec(n, k, 128, w.bits, False, torch.bfloat16, dynamic_activation=name == "zen_a8w4_avx2")
        ref_w = w.dequantize()
    packed = kernel.prepack(w, torch.bfloat16)
    bias = torch.randn(n, dtype=torch.bfloat16)
    plan = Plan(spec, (4,), (name, name)).encode()
    fp32_spec = dataclasses.replace(spec, act_dtype=torch.float32)
    for m in (1, 3):
        x = torch.randn(m, k).to(torch.bfloat16)
        residual = torch.randn(m, n) * 10
        for b in (None, bias):
            y = quant_linear(x, packed, [len(packed)], b, plan, residual=residual)
            ref = residual + x.float() @ ref_w.t() + (b.float() if b is not None else 0)
            assert y.dtype == torch.float32 and y.shape == (m, n)
            assert sqnr(y, ref) >= (45 if spec.dynamic_activation else 60), (m, b is not None)
            if kernel.supports(fp32_spec) is None:  # x in fp32 (exactly x): the kernel's own fp32 sums, then the add
                alone = run_kernel(kernel, x.float(), packed, b, fp32_spec)
                torch.testing.assert_close(y, residual + alone, rtol=0, atol=1e-5)
            else:  # no bf16 rounding of y on the way, as an add after the kernel has
                alone = run_kernel(kernel, x, packed, b, spec).float()
                assert (y - ref).abs().max() < (residual + alone - ref).abs().max() / 4
    # zero rows still return the residual's shape
    x0 = torch.empty(0, k, dtype=torch.bfloat16)
    assert quant_linear(x0, packed, [len(packed)], None, plan, residual=torch.empty(0, n)).shape == (0, n)


@pytest.mark.skipif(native.unavailable("tiles_dequant") is not None, reason="needs AVX2 and a C++ compiler")
def test_tiles_sgemm_is_exact_in_x_and_shares_the_packed_weight(monkeypatch):
    import dataclasses

    from zen_inductor.autotune import Tuner

    torch.manual_seed(0)
    w = int4_weight(72, 512, 256, outliers=True)
    spec = a8w4_spec(w, torch.bfloat16, dynamic=False)
    tiles = KERNELS["int4_tiles_sgemm"]
    packed = tiles.prepack(w, torch.bfloat16)
    x = torch.randn(70, 512, dtype=torch.bfloat16)
    ref = x.float() @ w.dequantize().t()
    # a weight-only kernel: only the fp32 GEMM's rounding and the bf16 output
    assert sqnr(run_kernel(tiles, x, packed, None, spec), ref) >= 45
    # in a dynamic-activation plan both tile kernels hold the same tensors: one copy of the weight
    packs = []
    for name in ("zen_a8w4_avx2", "int4_tiles_sgemm"):
        k = KERNELS[name]
        monkeypatch.setitem(KERNELS, name, dataclasses.replace(k, prepack=lambda w, dt, k=k: packs.append(k.name) or k.prepack(w, dt)))
    with config.patch(kernel_allow=("zen_a8w4_avx2", "int4_tiles_sgemm"), shape_bin_edges=(16,), autotune=False):
        tuning = Tuner().plan(a8w4_spec(w, torch.bfloat16), w, None)
    assert packs == ["zen_a8w4_avx2"]
    assert tuning.plan.bin_kernels == ("zen_a8w4_avx2", "zen_a8w4_avx2")  # the static rule for int8 activations


@pytest.mark.skipif(native.unavailable("tiles_dequant") is not None, reason="needs AVX2 and a C++ compiler")
def test_per_call_fp32_weights_are_made_in_blocks_of_rows(monkeypatch):
    from zen_inductor.kernels import DenseWeight, weights

    torch.manual_seed(0)
    n, k = 72, 256
    monkeypatch.setattr(weights, "FP32_BLOCK_BYTES", 32 * 4 * k)  # blocks of 32 rows: 32, 32, then a tail of 8
    made = []
    real = weights.sgemm_by_row_blocks

    def spy(x, n, k, make_rows, bias):
        return real(x, n, k, lambda out, start, end: made.append((start, end)) or make_rows(out, start, end), bias)

    monkeypatch.setattr(weights, "sgemm_by_row_blocks", spy)
    w = int4_weight(n, k, 64)
    dense = torch.randn(n, k, dtype=torch.bfloat16)
    bias = torch.randn(n, dtype=torch.bfloat16)
    for name, weight, ref_w in (("int4_tiles_sgemm", w, w.dequantize()), ("dense_sgemm", DenseWeight(dense), dense.float())):
        kernel = KERNELS[name]
        spec = LinearSpec(n=n, k=k, group_size=weight.group_size or k, bits=weight.bits, symmetric=weight.symmetric,
                          act_dtype=torch.bfloat16)
        packed = kernel.prepack(weight, torch.bfloat16)
        x = torch.randn(5, k, dtype=torch.bfloat16)
        made.clear()
        y = run_kernel(kernel, x, packed, bias, spec)
        assert made == [(0, 32), (32, 64), (64, 72)], name
        assert y.shape == (5, n) and sqnr(y, x.float() @ ref_w.t() + bias.float()) >= 45, name


@pytest.mark.parametrize("name", [
    pytest.param("zen_w4_avx2", marks=_needs("woq_avx2", "AVX2")),
    pytest.param("zen_w4_avx512", marks=_needs("woq_avx512", "AVX512-VNNI")),
])
@pytest.mark.parametrize("group", [64, 128, 256, 1024])  # 1024: per-channel
@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float32])
def test_weight_only_kernel_against_fp32_reference(group, act_dtype, name):
    torch.manual_seed(0)
    w4 = KERNELS[name]
    n, k = 136, 1024  # avx512: 16-row blocks, the last one half padding
    for outliers in (False, True):
        w = int4_weight(n, k, group, outliers)
        spec = a8w4_spec(w, act_dtype, dynamic=False)
        assert w4.supports(spec) is None
        packed = w4.prepack(w, act_dtype)
        bias = torch.randn(n).to(act_dtype)
        for m in (1, 3, 4, 9):  # the 4-row blocks and every remainder
            x = torch.randn(m, k).to(act_dtype)
            x[:, 7] *= 30  # an outlier channel costs int16 activations next to nothing
            for b in (None, bias):
                y = run_kernel(w4, x, packed, b, spec)
                ref = x.float() @ w.dequantize().t() + (b.float() if b is not None else 0)
                assert y.dtype == act_dtype and y.shape == (m, n)
                assert sqnr(y, ref) >= 45, (group, outliers, m, b is not None)
        # one row of x takes vpmaddubsw on split bytes of x, blocks of rows the int16 path: both
        # compute the same integer sums, so the results agree to the bit
        x = torch.randn(1, k).to(act_dtype)
        assert torch.equal(run_kernel(w4, x, packed, bias, spec), run_kernel(w4, x.expand(4, k), packed, bias, spec)[:1])


@pytest.mark.skipif(native.unavailable("woq_avx2") is not None, reason="needs AVX2 and a C++ compiler")
def test_int4_weight_only_model_runs_on_the_weight_only_kernel():
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType

    torch.manual_seed(0)
    m = quantize(torch.nn.Sequential(torch.nn.Linear(K, N)).to(torch.bfloat16).eval(),
                 IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64), mapping_type=MappingType.ASYMMETRIC))
    x = torch.randn(2, 3, K, dtype=torch.bfloat16)
    with config.patch(kernel_allow=("zen_w4_avx2",)), torch.no_grad():
        eager = m(x)
        y = compile_zen(m)(x)
    assert zen_inductor.counters["dequant_matmul.int4_asym_group64"] == 1
    assert set(zen_inductor.last_report()["matches"][0]["kernels"].values()) == {"zen_w4_avx2"}
    ref = reference_output(m, x)
    assert sqnr(y, ref) >= 45 and sqnr(y, ref) >= sqnr(eager, ref) - 6


@pytest.mark.parametrize("name", [
    pytest.param("zen_bf16_gemv_avx2", marks=_needs("bf16_gemv_avx2", "AVX2")),
    pytest.param("zen_bf16_blocks_avx2", marks=_needs("bf16_gemv_avx2", "AVX2")),
    pytest.param("zen_bf16_gemv_avx512", marks=_needs("bf16_gemv_avx512", "AVX512-BF16")),
    pytest.param("zen_bf16_rows_avx512", marks=_needs("bf16_gemv_avx512", "AVX512-BF16")),
])
def test_bf16_gemv_rows_and_blocks(name):
    from zen_inductor.kernels import DenseWeight

    torch.manual_seed(0)
    gemv = KERNELS[name]
    weight = torch.randn(100, 512, dtype=torch.bfloat16)  # N not a multiple of 8: a tail block
    spec = LinearSpec(n=100, k=512, group_size=512, bits=16, symmetric=True, act_dtype=torch.bfloat16)
    packed = gemv.prepack(DenseWeight(weight), torch.bfloat16)
    # rows: the model's own weight, no copy; blocks: a padded copy, 8 rows x 8 columns per block
    # (avx512: 16 rows x pairs of columns)
    assert (packed[0].data_ptr() == weight.data_ptr()) == (name in ("zen_bf16_gemv_avx2", "zen_bf16_rows_avx512"))
    bias = torch.randn(100, dtype=torch.bfloat16)
    for m in (1, 3, 6):  # 6: a block of 4 rows of x, then one of 2
        x = torch.randn(m, 512, dtype=torch.bfloat16)
        for b in (None, bias):
            ref = x.float() @ weight.float().t() + (b.float() if b is not None else 0)
            y = run_kernel(gemv, x, packed, b, spec)
            assert y.dtype == torch.bfloat16 and sqnr(y, ref) >= 45
    # the SwiGLU epilogue in the kernel, with a bias: gate and up blocks of 8 rows in turn
    swiglu = dataclasses.replace(spec, n=96, epilogue="swiglu")
    packed = gemv.prepack(DenseWeight(weight[:96]), torch.bfloat16)
    x = torch.randn(2, 512, dtype=torch.bfloat16)
    ref = apply_epilogue((x.float() @ weight[:96].float().t() + bias[:96].float()), swiglu)
    assert sqnr(run_kernel(gemv, x, packed, bias[:96], swiglu), ref) >= 45
    if name == "zen_bf16_rows_avx512":  # rows of K = 552: 64 at a time, then 32, then 8 under a mask
        wide = torch.randn(40, 552, dtype=torch.bfloat16)
        tail_spec = LinearSpec(n=40, k=552, group_size=552, bits=16, symmetric=True, act_dtype=torch.bfloat16)
        x = torch.randn(3, 552, dtype=torch.bfloat16)
        y = run_kernel(gemv, x, gemv.prepack(DenseWeight(wide), torch.bfloat16), None, tail_spec)
        assert sqnr(y, x.float() @ wide.float().t()) >= 45
    odd_k = LinearSpec(n=100, k=501, group_size=501, bits=16, symmetric=True, act_dtype=torch.bfloat16)
    assert ("odd" if name.endswith("avx512") else "multiple of 8") in gemv.supports(odd_k)


@pytest.mark.parametrize("name", [
    pytest.param("zen_w8_avx2", marks=_needs("woq_avx2", "AVX2")),
    pytest.param("zen_w8_avx512", marks=_needs("woq_avx512", "AVX512-VNNI")),
])
@pytest.mark.parametrize("group", [128, 1024])  # per-group and per-channel (split into groups of 128)
def test_int8_weight_only_kernel_against_fp32_reference(group, name):
    torch.manual_seed(0)
    w8 = KERNELS[name]
    n, k = 72, 1024  # avx512: 16-row blocks, the last one half padding
    g = torch.Generator().manual_seed(1)
    for symmetric in (True, False):
        codes = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        scale = torch.rand(n, k // group, generator=g) * 0.002 + 0.0001
        offset = torch.zeros_like(scale) if symmetric else torch.randn(n, k // group, generator=g) * 0.01
        w = QuantWeight(codes=codes, scale=scale, offset=offset, zero_point=None, group_size=group, bits=8)
        spec = LinearSpec(n=n, k=k, group_size=group, bits=8, symmetric=symmetric, act_dtype=torch.bfloat16)
        assert w8.supports(spec) is None
        packed = w8.prepack(w, torch.bfloat16)
        for m in (1, 6):
            x = torch.randn(m, k, dtype=torch.bfloat16)
            ref = x.float() @ w.dequantize().t()
            assert sqnr(run_kernel(w8, x, packed, None, spec), ref) >= 45, (symmetric, m)
        bias = torch.randn(n, dtype=torch.bfloat16)
        x = torch.randn(3, k, dtype=torch.bfloat16)
        swiglu = dataclasses.replace(spec, n=64, epilogue="swiglu")  # gate and up blocks of 8 rows in turn
        half = QuantWeight(codes=codes[:64], scale=scale[:64], offset=offset[:64], zero_point=None, group_size=group, bits=8)
        ref = apply_epilogue(x.float() @ half.dequantize().t() + bias[:64].float(), swiglu)
        assert sqnr(run_kernel(w8, x, w8.prepack(half, torch.bfloat16), bias[:64], swiglu), ref) >= 45
    assert w8.supports(dataclasses.replace(spec, bits=4)).startswith("not for")


@pytest.mark.skipif(native.unavailable("tiles_dequant") is not None, reason="needs AVX2 and a C++ compiler")
def test_int8_tiles_sgemm_is_exact_in_x_and_shares_the_packed_weight():
    g = torch.Generator().manual_seed(3)
    n, k = 264, 512
    for group in (128, 512):
        w = QuantWeight(codes=torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8),
                        scale=torch.rand(n, k // group, generator=g) * 0.01, offset=torch.randn(n, k // group, generator=g) * 0.01,
                        zero_point=None, group_size=group, bits=8)
        spec = LinearSpec(n=n, k=k, group_size=group, bits=8, symmetric=False, act_dtype=torch.bfloat16)
        tiles, gemv = KERNELS["int8_tiles_sgemm"], KERNELS["zen_w8_avx2"]
        assert tiles.layout == gemv.layout  # one packed copy serves both
        packed = tiles.prepack(w, spec.act_dtype)
        x = torch.randn(70, k).to(torch.bfloat16)
        ref = x.float() @ w.dequantize().t()
        # fp32 GEMM on the exactly dequantized weight: only the bf16 rounding of y remains
        assert sqnr(run_kernel(tiles, x, packed, None, spec), ref) >= 50
        assert sqnr(run_kernel(gemv, x, packed, None, spec), ref) >= 45


def test_a_compile_builds_only_the_libraries_its_linears_need(monkeypatch):
    """A bf16 model needs the bf16 GEMV at most; an int4 weight-only one the int4 GEMV and the tile
    dequantizer, not the int8-activation kernel (all four were built at every compile before)."""
    from quantized import K as HK

    started = []
    real = native.start
    monkeypatch.setattr(native, "start", lambda name: started.append(name) or real(name))
    x = torch.randn(3, HK, dtype=torch.bfloat16)
    dense = torch.nn.Linear(HK, 64, bias=False).to(torch.bfloat16).eval()
    # on a CPU with a native bf16 GEMM and zentorch the bf16 copy's GEMM leaves the tile dequantizer out
    int4_libraries = {"woq_avx2"} if KERNELS["int4_tiles_sgemm"].dominated_by and zentorch_unavailable() is None else {"woq_avx2", "tiles_dequant"}
    # and zentorch's bf16 GEMM leaves the AVX2 bf16 GEMVs out: a bf16 model builds the AVX512 one at most
    zentorch_gemm = KERNELS["zen_bf16_gemv_avx2"].dominated_by and zentorch_unavailable() is None
    bf16_libraries = set() if zentorch_gemm else {"bf16_gemv_avx2"}
    if native.unavailable("bf16_gemv_avx512") is None:
        bf16_libraries.add("bf16_gemv_avx512")
    if native.unavailable("woq_avx512") is None:
        int4_libraries.add("woq_avx512")
    for model, expected in ((dense, bf16_libraries), (HandDequant(64, True, 4).eval(), int4_libraries)):
        started.clear()
        torch._dynamo.reset()
        with torch.no_grad():
            compile_zen(model)(x)
        assert set(started) == expected



def test_an_avx2_cpu_neither_builds_nor_offers_avx512_kernels(monkeypatch):
    """config.cpu_capability="avx2" makes any machine an AVX2 one to zen: the AVX-512 libraries are
    not started, their kernels are out with the reason, zentorch is off."""
    from zen_inductor import cpu

    started = []
    real = native.start
    monkeypatch.setattr(native, "start", lambda name: started.append(name) or real(name))
    with config.patch(cpu_capability="avx2"):
        assert not any(f.startswith(("avx512", "amx")) for f in cpu.flags()) and not cpu.native_bf16_gemm()
        assert "CPU lacks" in cpu.zentorch_unavailable() and "avx512_bf16" in native.missing_isa("bf16_gemv_avx512")
        for bits, group in ((16, 512), (4, 128), (8, 512)):
            spec = LinearSpec(n=64, k=512, group_size=group, bits=bits, symmetric=True, act_dtype=torch.bfloat16)
            ok, excluded = candidates(spec)
            assert not [k.name for k in ok if "avx512" in k.name or k.source == "zentorch"]
            assert "CPU lacks" in excluded["zen_bf16_gemv_avx512" if bits == 16 else f"zen_w{bits}_avx512"]
    assert started and not [name for name in started if native.SOURCES[name][2] != ("avx2", "fma")]


def test_cpu_capability_default_hides_every_vector_extension():
    from zen_inductor import cpu

    with config.patch(cpu_capability="default"):
        assert not any(f.startswith(("avx", "fma", "amx")) for f in cpu.flags())
        assert native.missing_isa("woq_avx2") == "CPU lacks avx2, fma" == native.unavailable("woq_avx2")


def _merged_rows_are_read_where_they_lie(rows, int_mm, codes, scale, spec, g):
    """A weight made of three (q/k/v), then of two in 8-row tiles in turn (gate/up with the SwiGLU
    epilogue) computes what its contiguous copy computes with either kernel of the layout (bit
    for bit but for _int_mm's SwiGLU, made of gate's and up's products by ATen's silu where the
    copy's goes through the epilogue pass), reading the parts' own tensors: no packed tensor is a
    copy of their rows."""
    def part(lo, hi):
        return QuantWeight(codes=codes[lo:hi].clone(), scale=scale[lo:hi], offset=scale[lo:hi] * 0, zero_point=None,
                           group_size=spec.k, bits=8)

    q, k, v = part(0, 40), part(40, 56), part(56, 72)
    merged = QuantWeight.concat([q, k, v])
    gate_up = QuantWeight.concat([part(0, 32), part(32, 64)]).reordered(swiglu_row_order(32))
    for w, wspec in ((merged, spec), (gate_up, dataclasses.replace(spec, n=64, epilogue="swiglu"))):
        copy = QuantWeight(w.codes.clone(), w.scale, w.offset, None, w.group_size, 8)  # no row sources: the rows in order
        packed, packed_copy = rows.prepack(w, spec.act_dtype), rows.prepack(copy, spec.act_dtype)
        sources = {t.data_ptr() for t in w.row_sources.tensors}
        assert {t.data_ptr() for t in packed if t.dtype == torch.int8 and t.numel()} == sources
        for m in (1, 5, 33):
            x = torch.randn(m, spec.k, generator=g).to(spec.act_dtype)
            for kernel in (rows, int_mm):
                exact = {} if wspec.epilogue and kernel is int_mm else {"rtol": 0, "atol": 0}  # silu by ATen on the parts
                torch.testing.assert_close(run_kernel(kernel, x, packed, None, wspec), run_kernel(kernel, x, packed_copy, None, wspec),
                                           **exact)


@_needs("int8_quantize_rows", "AVX2")
@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float32])
def test_int8_quantize_rows_is_atens_arithmetic_bit_for_bit(act_dtype):
    """The prefill's _int_mm takes x quantized in one pass of our C++: its codes and scales must be
    the ATen reference's exactly, rounding halves to even, a zero row's scale clamped, many rows
    split across threads; K not a multiple of 8 goes to the reference."""
    from zen_inductor.kernels.int8_rows import quantize_rows, quantize_rows_reference

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(67, 1056, generator=g) * 3).to(act_dtype)
    x[1] = 0
    x[2, :8] = torch.tensor([127.0, 2.5, -3.5, 0.5, -0.5, 126.5, -127.0, 1.5])  # scale exactly 1: ties
    x[3, :4] = torch.tensor([1e30, -1e30, 1e-30, 0.0]).to(act_dtype)
    codes, scale = quantize_rows(x)
    ref_codes, ref_scale = quantize_rows_reference(x)
    assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)
    assert codes[2, :8].tolist() == [127, 2, -4, 0, 0, 126, -127, 2]
    assert codes[1].eq(0).all() and scale[1, 0] == torch.tensor(1e-7) / 127.0
    odd = x[:5, :1052]
    assert all(torch.equal(a, b) for a, b in zip(quantize_rows(odd), quantize_rows_reference(odd)))


@_needs("int8_rows_epilogue", "AVX2")
@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float32])
def test_int_mm_epilogue_is_the_aten_ops_in_one_pass(act_dtype, monkeypatch):
    """aten_int_mm_da8's epilogue (int32 sums times x's row scale and W's column scale, bias, SwiGLU)
    in one pass of our C++: the ATen ops' output bit for bit for a plain and a merged linear's
    parts side by side, within fp32's rounding of silu for SwiGLU; many rows split across threads,
    and none. The kernel runs it there: with the ATen ops made to fail, it still computes."""
    from zen_inductor.kernels import int8_rows

    g = torch.Generator().manual_seed(0)
    none = torch.empty(0, dtype=torch.int64)
    for rows in (0, 1, 67):
        sums = [torch.randint(-2 ** 22, 2 ** 22, (rows, n), generator=g, dtype=torch.int32) for n in (48, 16, 16)]
        x_scale = torch.rand(rows, 1, generator=g) * 1e-3
        w_scale = torch.rand(80, generator=g) * 1e-3
        for bias in (None, torch.randn(80, generator=g).to(act_dtype)):
            for parts in (sums[:1], sums):
                spec = LinearSpec(sum(p.shape[1] for p in parts), 64, 64, 8, True, act_dtype, dynamic_activation=True)
                b = None if bias is None else bias[:spec.n]
                ref = int8_rows.int_mm_epilogue_reference(parts, False, none, x_scale, w_scale[:spec.n], b, spec, act_dtype)
                got = int8_rows._int_mm_epilogue(parts, False, x_scale, w_scale[:spec.n], b, act_dtype)
                assert got.dtype == act_dtype and torch.equal(got, ref)
            pair, spec = sums[1:], LinearSpec(16, 64, 64, 8, True, act_dtype, dynamic_activation=True, epilogue="swiglu")
            b = None if bias is None else bias[:32]
            ref = int8_rows.int_mm_epilogue_reference(pair, True, none, x_scale, w_scale[:32], b, spec, act_dtype)
            got = int8_rows._int_mm_epilogue(pair, True, x_scale, w_scale[:32], b, act_dtype)
            assert got.shape == (rows, 16)
            torch.testing.assert_close(got, ref, rtol=2 ** -20 if act_dtype == torch.float32 else 2 ** -8, atol=1e-6)
    k, n = 64, 32
    codes = torch.randint(-128, 128, (2 * n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(2 * n, 1, generator=g) * 1e-2
    w, gate, up = (QuantWeight(codes=codes[r], scale=scale[r], offset=scale[r] * 0, zero_point=None, group_size=k, bits=8)
                   for r in (slice(None), slice(0, n), slice(n, None)))
    gate_up = QuantWeight.concat([gate, up]).reordered(swiglu_row_order(n))
    x = torch.randn(40, k, generator=g).to(act_dtype)
    int_mm = KERNELS["aten_int_mm_da8"]
    plain = LinearSpec(2 * n, k, k, 8, True, act_dtype, dynamic_activation=True)
    cases = ((w, plain), (gate_up, dataclasses.replace(plain, epilogue="swiglu")))
    with config.patch(cpu_capability="default"):  # no C++: the ATen ops
        expected = [run_kernel(int_mm, x, int_mm.prepack(v, act_dtype), None, s) for v, s in cases]
    monkeypatch.setattr(int8_rows, "int_mm_epilogue_reference", lambda *a: pytest.fail("the ATen ops ran"))
    got = [run_kernel(int_mm, x, int_mm.prepack(v, act_dtype), None, s) for v, s in cases]
    assert torch.equal(got[0], expected[0]) and got[1].shape == (40, n)
    torch.testing.assert_close(got[1], expected[1], rtol=2 ** -20 if act_dtype == torch.float32 else 2 ** -8, atol=1e-6)


@pytest.mark.parametrize("name", [pytest.param("zen_a8w8_rows_avx2", marks=_needs("a8w8_rows_avx2", "AVX2")),
                                  pytest.param("zen_a8w8_rows_avx512", marks=_needs("a8w8_rows_avx512", "AVX512-VNNI"))])
@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float32])
def test_int8_rows_gemv_computes_what_int_mm_computes(name, act_dtype):
    """The own-rows kernels quantize x as torchao's dynamic activations do and read the model's
    own int8 rows: their output is aten_int_mm_da8's, bit for bit (fp32 sums of exact integer dot
    products, scaled in the same order), with bias, a residual and gate/up fused into SwiGLU.
    K = 1056 leaves the AVX-512 build a 32-byte tail of each row to read under its mask."""
    from zen_inductor.kernels import Plan, quant_linear

    rows, int_mm = KERNELS[name], KERNELS["aten_int_mm_da8"]
    n, k = 72, 1056  # 9 output tiles of 8
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)  # -128 too: |w| is 128 unsigned
    codes[0, :64] = -128
    scale = torch.rand(n, 1, generator=g) * 0.002 + 1e-4
    w = QuantWeight(codes=codes, scale=scale, offset=torch.zeros_like(scale), zero_point=None, group_size=k, bits=8)
    spec = LinearSpec(n, k, k, 8, True, act_dtype, dynamic_activation=True)
    packed = rows.prepack(w, act_dtype)
    assert packed[2].data_ptr() == codes.data_ptr()  # the model's bytes, no copy
    bias = torch.randn(n).to(act_dtype)
    for m in (1, 3, 4, 5, 17):
        x = torch.randn(m, k, generator=g).to(act_dtype)
        x[:, 3] *= 6  # a loud channel: a coarser int8 grid, the same one in both
        for b in (None, bias):
            y = run_kernel(rows, x, packed, b, spec)
            torch.testing.assert_close(y, run_kernel(int_mm, x, packed, b, spec), rtol=0, atol=0)
            ref = x.float() @ w.dequantize().t() + (b.float() if b is not None else 0)
            assert sqnr(y, ref) >= 30, (m, b is not None)
    x = torch.randn(3, k, generator=g).to(act_dtype)
    residual = torch.randn(3, n) * 10
    plan = Plan(spec, (4,), (rows.name, rows.name)).encode()
    y = quant_linear(x, packed, [len(packed)], bias, plan, residual=residual)
    torch.testing.assert_close(y, residual + run_kernel(int_mm, x.float(), packed, bias.float(), dataclasses.replace(spec, act_dtype=torch.float32)),
                               rtol=0, atol=1e-4)
    swiglu = dataclasses.replace(spec, n=64, epilogue="swiglu")  # gate and up blocks of 8 rows in turn
    half = QuantWeight(codes=codes[:64], scale=scale[:64], offset=scale[:64] * 0, zero_point=None, group_size=k, bits=8)
    ref = apply_epilogue(run_kernel(int_mm, x, int_mm.prepack(half, act_dtype), bias[:64], dataclasses.replace(swiglu, epilogue="")).float(), swiglu)
    assert sqnr(run_kernel(rows, x, rows.prepack(half, act_dtype), bias[:64], swiglu), ref) >= 45
    _merged_rows_are_read_where_they_lie(rows, int_mm, codes, scale, spec, g)
    assert rows.supports(dataclasses.replace(spec, k=1000, group_size=1000)) == "K=1000 is not a multiple of 32"
    assert rows.supports(dataclasses.replace(spec, group_size=128)) == "per-channel symmetric weights only"


@_needs("int8_gemm_avx2", "AVX2")
@settings(max_examples=20, derandomize=True, deadline=None)
@given(rows=st.integers(1, 40), n=st.integers(1, 300), k=st.integers(1, 2200), threads=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_int8_gemm_avx2_sums_exactly(rows, n, k, threads, seed):
    """zen_a8w8_gemm_avx2's sums are the integer products exactly, whatever M (tiles of 6 and a
    rest), N (panels of 16, blocks of 256 and the threads' shares), K (odd, past a block of
    1024) and codes, -128 and 127 included: no 16-bit sum saturates."""
    from zen_inductor.kernels import int8_rows

    g = torch.Generator().manual_seed(seed)
    xq = torch.randint(-127, 128, (rows, k), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    xq[0, :64], w[0, :64] = 127, 127 if seed % 2 else -128  # the products that saturate vpmaddubsw
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sums = int8_rows._gemm_sums(xq, w)
    finally:
        torch.set_num_threads(previous)
    assert sums.dtype == torch.int32 and torch.equal(sums.long(), xq.long() @ w.long().t())


def test_int_mm_sums_are_exact_where_onednn_saturates():
    """Capped at AVX2, oneDNN's _int_mm gives wrong sums (the probe sees it): the kernel is not offered
    there, and its sums, where a plan still runs it, come from exact fp32 stretches instead."""
    code = (
        "import torch\n"
        "from zen_inductor.kernels import int8_rows\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x = (torch.randn(64, 2048, generator=g) * 40).round().clamp(-127, 127).to(torch.int8)\n"
        "w = (torch.randn(96, 2048, generator=g) * 40).round().clamp(-127, 127).to(torch.int8)\n"
        "exact = x.long() @ w.long().t()\n"
        "print(int8_rows.int_mm_exact(), torch.equal(torch._int_mm(x, w.t()).long(), exact),\n"
        "      torch.equal(int8_rows._int_mm_sums(x, w).long(), exact))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"})
    probe, int_mm_right, ours_right = out.stdout.split()[-3:]
    assert ours_right == "True"
    assert probe == int_mm_right  # the probe tells where _int_mm is wrong (on this CPU capped at AVX2: False)
