"""Weights in groups of 32 (GGUF's Q4_0 / Q4_1 / Q8_0 block) on our native kernels.

The tiles keep their codes in blocks of 64 (an int4 block's low nibbles are one group, its high
nibbles the next) and the scales per group of 32; the AVX-512 kernels keep a record per group.
Shapes are SmolLM2-135M's K = 576 (nine blocks of 64, not a multiple of 128).
"""
import dataclasses
import json
import re

import pytest
import torch

import zen_inductor
from zen_inductor import config, native
from zen_inductor.kernels import KERNELS, LinearSpec, Plan, QuantWeight, epilogue_reference, quant_linear, run_kernel

from conftest import any_rows, compile_zen, quantize, sqnr
from quantized import fp32_weight

K = 576
ROWS_OF_X = (1, 2, 3, 4, 5, 17, 64, 130)  # 1: the nibble path; 4-row blocks and each remainder; prefill


def _needs(library):
    return pytest.mark.skipif(native.unavailable(library) is not None, reason=f"{library} cannot run here")


GEMVS = [
    pytest.param("zen_w4_avx2", marks=_needs("woq_avx2")),
    pytest.param("zen_w8_avx2", marks=_needs("woq_avx2")),
    pytest.param("zen_w4_avx512", marks=_needs("woq_avx512")),
    pytest.param("zen_w8_avx512", marks=_needs("woq_avx512")),
]
SGEMMS = [
    pytest.param("int4_tiles_sgemm", marks=_needs("tiles_dequant")),
    pytest.param("int8_tiles_sgemm", marks=_needs("tiles_dequant")),
]


def _weight(n, bits, symmetric, seed=0, k=K, group=32):
    """Codes, scales and offsets as a Q4_1 / Q8_0 checkpoint has them; a few groups 100x louder,
    so a group's sum that took its neighbour's scale would show."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-8, 8) if bits == 4 else (-128, 128)
    codes = torch.randint(lo, hi, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, k // group, generator=g) * (0.02 if bits == 4 else 0.002) + 0.0005
    scale.view(-1)[torch.randperm(scale.numel(), generator=g)[: scale.numel() // 50]] *= 100
    offset = torch.zeros_like(scale) if symmetric else torch.randn(n, k // group, generator=g) * 0.01
    return QuantWeight(codes=codes, scale=scale, offset=offset, zero_point=None, group_size=group, bits=bits)


def _spec(w, act_dtype, epilogue=""):
    return LinearSpec(n=w.n, k=w.k, group_size=w.group_size, bits=w.bits, symmetric=w.symmetric,
                      act_dtype=act_dtype, epilogue=epilogue)


def _bits(name):
    return 4 if "_w4_" in name or name.startswith("int4") else 8


@pytest.mark.parametrize("name", GEMVS + SGEMMS)
@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("symmetric", [True, False])
def test_kernels_against_fp32_reference(name, act_dtype, symmetric):
    kernel = KERNELS[name]
    bits = _bits(name)
    n = 72  # the AVX-512 kernels' last 16-row block half padding
    w = _weight(n, bits, symmetric)
    spec = _spec(w, act_dtype)
    assert kernel.supports(spec) is None
    packed = kernel.prepack(w, act_dtype)
    w32 = w.dequantize()
    bias = torch.randn(n).to(act_dtype)
    torch.manual_seed(1)
    for m in ROWS_OF_X:
        x = torch.randn(m, K).to(act_dtype)
        x[:, 40] *= 30  # a loud channel in the second group of a block
        for b in (None, bias):
            y = run_kernel(kernel, x, packed, b, spec)
            ref = x.float() @ w32.t() + (b.float() if b is not None else 0)
            assert y.dtype == act_dtype and y.shape == (m, n)
            assert sqnr(y, ref) >= 45, (m, b is not None)


@pytest.mark.parametrize("name", GEMVS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_swiglu_epilogue(name, symmetric):
    kernel = KERNELS[name]
    assert "swiglu" in kernel.epilogues
    bits = _bits(name)
    w = _weight(96, bits, symmetric, seed=2)  # gate and up blocks of 8 rows in turn, 48 outputs
    spec = _spec(w, torch.bfloat16, epilogue="swiglu")
    packed = kernel.prepack(w, torch.bfloat16)
    bias = torch.randn(96, dtype=torch.bfloat16)
    torch.manual_seed(3)
    for m in ROWS_OF_X:
        x = torch.randn(m, K, dtype=torch.bfloat16)
        for b in (None, bias):
            y = run_kernel(kernel, x, packed, b, spec)
            ref = epilogue_reference(x.float() @ w.dequantize().t() + (b.float() if b is not None else 0), spec)
            assert y.shape == (m, 48) and sqnr(y, ref) >= 45, (m, b is not None)


@pytest.mark.parametrize("name", GEMVS)
def test_residual_added_as_the_kernel_stores(name):
    kernel = KERNELS[name]
    assert kernel.residual
    bits = _bits(name)
    w = _weight(72, bits, symmetric=False, seed=4)
    spec = _spec(w, torch.bfloat16)
    packed = kernel.prepack(w, torch.bfloat16)
    plan = Plan(spec, (4,), (name, name)).encode()
    bias = torch.randn(72, dtype=torch.bfloat16)
    torch.manual_seed(5)
    for m in (1, 3, 17):
        x = torch.randn(m, K, dtype=torch.bfloat16)
        residual = torch.randn(m, 72) * 10
        for b in (None, bias):
            y = quant_linear(x, packed, [len(packed)], b, plan, residual=residual)
            ref = residual + x.float() @ w.dequantize().t() + (b.float() if b is not None else 0)
            assert y.dtype == torch.float32 and sqnr(y, ref) >= 60, (m, b is not None)


@pytest.mark.skipif(native.unavailable("woq_avx2") is not None, reason="woq_avx2 cannot run here")
@pytest.mark.parametrize("bits", [4, 8])
def test_one_row_and_blocks_of_rows_give_the_same_sums(bits):
    """Decode (int4: vpmaddubsw on the nibbles, the two groups of a block apart) and the int16
    path of blocks of rows compute the same integer sums: the results agree to the bit."""
    kernel = KERNELS[f"zen_w{bits}_avx2"]
    w = _weight(64, bits, symmetric=False, seed=6)
    spec = _spec(w, torch.bfloat16)
    packed = kernel.prepack(w, torch.bfloat16)
    x = torch.randn(1, K, dtype=torch.bfloat16)
    one = run_kernel(kernel, x, packed, None, spec)
    assert torch.equal(one, run_kernel(kernel, x.expand(4, K), packed, None, spec)[:1])


@pytest.mark.parametrize("name", SGEMMS)
def test_tiles_dequantize_exactly(name):
    """x = I in fp32: the GEMM returns the weight as the kernel dequantized it (u * s + (o - 8 s),
    so an fp32 rounding away from c * s + o): a value that took another group's scale would be
    off by far more."""
    kernel = KERNELS[name]
    bits = _bits(name)
    w = _weight(24, bits, symmetric=False, seed=7)
    spec = _spec(w, torch.float32)
    y = run_kernel(kernel, torch.eye(K), kernel.prepack(w, torch.float32), None, spec)
    torch.testing.assert_close(y.t(), w.dequantize(), rtol=1e-6, atol=1e-6)


def test_reasons_for_what_the_layout_does_not_take():
    w = _weight(64, 4, symmetric=True)
    spec = _spec(w, torch.bfloat16)
    for name in ("zen_w4_avx2", "zen_w4_avx512", "int4_tiles_sgemm"):
        assert KERNELS[name].supports(spec) is None, name
        assert "blocks of 64" in KERNELS[name].supports(dataclasses.replace(spec, k=96))
        assert "multiples of 64" in KERNELS[name].supports(dataclasses.replace(spec, group_size=48))
    assert KERNELS["zen_w8_avx2"].supports(dataclasses.replace(spec, bits=8)) is None
    # the int8 x int4 kernel shares the tiles but reads one group a block: it declines them, and
    # never runs on them
    a8w4 = KERNELS["zen_a8w4_avx2"]
    da8 = dataclasses.replace(spec, dynamic_activation=True)
    assert "group size 32" in a8w4.supports(da8)
    assert a8w4.supports(dataclasses.replace(da8, group_size=64)) is None
    with pytest.raises(ValueError, match="groups of 32"):
        a8w4.run(torch.randn(1, K, dtype=torch.bfloat16), a8w4.prepack(w, torch.bfloat16), None, da8)


@pytest.mark.skipif(native.unavailable("woq_avx2") is not None, reason="woq_avx2 cannot run here")
def test_torchao_group32_model_decodes_on_a_zen_kernel():
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType

    torch.manual_seed(0)
    m = quantize(torch.nn.Sequential(torch.nn.Linear(K, 192)).to(torch.bfloat16).eval(),
                 IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32), mapping_type=MappingType.ASYMMETRIC))
    x = torch.randn(1, K, dtype=torch.bfloat16)
    with torch.no_grad():
        eager = m(x)
        y = compile_zen(m)(x)
    assert zen_inductor.counters["dequant_matmul.int4_asym_group32"] == 1
    report = zen_inductor.last_report()
    excluded = report["autotune"][0]["excluded"]
    assert not any("multiples of 64" in excluded.get(name, "") for name in ("zen_w4_avx2", "zen_w4_avx512"))
    ref = x.float() @ fp32_weight(m[0].weight).t() + m[0].bias.float()
    assert sqnr(y, ref) >= 40 and sqnr(y, ref) >= sqnr(eager, ref) - 6
    # restricted to the native kernels and ATen's int4pack (which served groups of 32 before):
    # a zen kernel decodes
    torch._dynamo.reset()
    with config.patch(kernel_allow=("zen_w4_avx2", "zen_w4_avx512", "aten_int4pack_mm")), torch.no_grad():
        y = compile_zen(m)(x)
    assert report is not zen_inductor.last_report()
    assert zen_inductor.last_report()["matches"][0]["kernels"]["1"].startswith("zen_w4_")
    assert sqnr(y, ref) >= 40


def _float16_exact_weight(n, bits, symmetric, seed=0):
    """Scales, and what the packing stores of offsets (offset - z * scale), that float16 holds
    exactly, as it holds GGUF's block d and m."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-8, 8) if bits == 4 else (-128, 128)
    codes = torch.randint(lo, hi, (n, K), generator=g, dtype=torch.int8)
    scale = torch.randint(8, 32, (n, K // 32), generator=g).float() / 1024
    stored = torch.randint(-64, 64, (n, K // 32), generator=g).float() / 1024
    offset = torch.zeros(n, K // 32) if symmetric else stored + (8 if bits == 4 else 128) * scale
    return QuantWeight(codes, scale, offset, None, 32, bits)


@_needs("woq_avx512")
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_record_tails_are_as_small_as_exact(bits, symmetric):
    """A record's tail holds 16 scales, and 16 offsets unless the weight is symmetric (Q8_0, Q4_0:
    the kernel knows them as -z scale), in float16 where every value is one exactly, else fp32;
    the kernel's answer holds the bar with each."""
    kernel = KERNELS[f"zen_w{bits}_avx512"]
    code_bytes = 32 * 16 * bits // 8
    values = 16 if symmetric else 32  # a record's scales (and offsets)
    n = 48
    spec = LinearSpec(n=n, k=K, group_size=32, bits=bits, symmetric=symmetric, act_dtype=torch.bfloat16)
    exact, inexact = _float16_exact_weight(n, bits, symmetric), _weight(n, bits, symmetric=symmetric)
    for w, value_bytes in ((exact, 2), (inexact, 4)):
        packed = kernel.prepack(w, spec.act_dtype)
        assert packed[0].shape[2] == code_bytes + values * value_bytes
        for m in (1, 3, 5):
            x = torch.randn(m, K).to(torch.bfloat16)
            y = run_kernel(kernel, x, packed, None, spec)
            assert sqnr(y, x.float() @ w.dequantize().float().t()) >= 45, (m, value_bytes)


def _int8_per_group(x: torch.Tensor, group: int = 32) -> torch.Tensor:
    """x as the int8-activation kernels see it: symmetric int8 per row and group, dequantized."""
    g = x.float().view(x.shape[0], -1, group)
    scale = g.abs().amax(-1, keepdim=True) / 127
    return (torch.round(g / torch.where(scale > 0, scale, 1)) * scale).view(x.shape)


@pytest.mark.skipif(native.unavailable("woq_a8_avx512") is not None, reason="woq_a8_avx512 cannot run here")
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float32])
def test_int8_activation_blocks_compute_the_weight_on_x_quantized_per_group(bits, act_dtype):
    kernel = KERNELS[f"zen_a8w{bits}_avx512"]
    w = _weight(72, bits, symmetric=bits == 8, seed=7)
    spec = _spec(w, act_dtype)
    assert kernel.supports(spec) is not None  # weight-only: only where config allows int8 activations
    with config.patch(int8_activations_for_weight_only=True):
        assert kernel.supports(spec) is None
    packed = kernel.prepack(w, act_dtype)
    w32 = w.dequantize()
    torch.manual_seed(8)
    for m in ROWS_OF_X:
        x = torch.randn(m, K).to(act_dtype)
        x[:, 40] *= 30
        y = run_kernel(kernel, x, packed, None, spec)
        assert sqnr(y, x.float() @ w32.t()) >= 30, m  # the bar of dynamic activation quantization
        # exactly W on x quantized per group of 32: integer sums, fp32 scales
        assert sqnr(y, _int8_per_group(x) @ w32.t()) >= (60 if act_dtype == torch.float32 else 45), m


def _q8_0_file_weight(n, seed=8):
    """A weight quantized to Q8_0 by the gguf package, as its blocks and as a QuantWeight."""
    import gguf

    from zen_inductor import gguf_model

    g = torch.Generator().manual_seed(seed)
    raw = gguf.quantize((torch.randn(n, K, generator=g) * 0.05).numpy(), gguf.GGMLQuantizationType.Q8_0)
    blocks = gguf_model._blocks("Q8_0", raw)
    qs, d, _ = gguf_model.split_blocks("Q8_0", blocks)
    w = QuantWeight(codes=qs.reshape(n, K), scale=d.float(), offset=torch.zeros(n, K // 32), zero_point=None,
                    group_size=32, bits=8)
    return blocks, w


Q8_0_KERNELS = [
    pytest.param("zen_q8_0_rows", marks=_needs("q8_0_rows")),  # the GEMV
    pytest.param("zen_q8_0_gemm", marks=_needs("q8_0_gemm")),  # fp32 panels of 16 rows, 6 rows of x at a time
]


@pytest.mark.parametrize("name", Q8_0_KERNELS)
@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float32])
def test_q8_0_kernels_pack_the_files_own_bytes_and_compute_with_them(name, act_dtype):
    kernel = KERNELS[name]
    torch.manual_seed(9)
    for n in (96, 104):  # 104: a last panel of 8 rows
        blocks, w = _q8_0_file_weight(n)
        packed = kernel.prepack(w, act_dtype)
        assert torch.equal(packed[0], blocks)  # the file's bytes: a tied model's table is the same tensor
        bias = torch.randn(n).to(act_dtype)
        for epilogue in ("", "swiglu"):
            spec = _spec(w, act_dtype, epilogue)
            if n % 16 and epilogue:  # gate and up tiles of 8 rows each
                assert "swiglu" in kernel.supports(spec)
                continue
            assert kernel.supports(spec) is None
            for m in ROWS_OF_X + (6, 7, 12):  # and the GEMM's 6-row blocks
                x = torch.randn(m, K).to(act_dtype)
                x[:, 40] *= 30
                for b in (None, bias):
                    y = run_kernel(kernel, x, packed, b, spec)
                    ref = epilogue_reference(x.float() @ w.dequantize().t() + (b.float() if b is not None else 0), spec)
                    assert y.dtype == act_dtype and y.shape == (m, spec.out_n)
                    assert sqnr(y, ref) >= 45, (n, epilogue, m, b is not None)
        residual = torch.randn(7, n) * 10
        x = torch.randn(7, K).to(act_dtype)
        plan = Plan(_spec(w, act_dtype), (4,), (name,) * 2).encode()
        y = quant_linear(x, packed, [1], None, plan, residual=residual)
        assert sqnr(y, residual + x.float() @ w.dequantize().t()) >= 60, n


def test_q8_0_rows_takes_only_q8_0_weights():
    kernel = KERNELS["zen_q8_0_rows"]
    _, w = _q8_0_file_weight(16)
    spec = _spec(w, torch.float32)
    assert kernel.supports(spec) is None
    assert "symmetric in blocks of 32" in kernel.supports(dataclasses.replace(spec, symmetric=False))
    assert "symmetric in blocks of 32" in kernel.supports(dataclasses.replace(spec, group_size=64, k=K))
    assert kernel.supports(dataclasses.replace(spec, bits=4)).startswith("for int8")
    not_float16 = dataclasses.replace(w, scale=w.scale * (1 + 1e-6))
    with pytest.raises(ValueError, match="not float16"):
        kernel.prepack(not_float16, torch.float32)


@_needs("woq_avx2")
def test_a_plan_carries_only_the_packed_tensors_its_kernels_read(dumped):
    """The int4 tiles are packed with column sums that only zen_a8w4_avx2 reads: a plan of the
    weight-only kernels hands the op the tiles, scales and offsets alone."""
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType

    from quantized import quant_linear_calls

    torch.manual_seed(0)
    m = quantize(torch.nn.Sequential(torch.nn.Linear(K, 192)).to(torch.bfloat16).eval(),
                 IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32), mapping_type=MappingType.ASYMMETRIC))
    x = any_rows(torch.randn(3, K, dtype=torch.bfloat16))
    with config.patch(kernel_allow=("zen_w4_avx2", "int4_tiles_sgemm")), torch.no_grad():
        y = compile_zen(m)(x)
    assert sqnr(y, x.float() @ fp32_weight(m[0].weight).t() + m[0].bias.float()) >= 40
    (call,) = quant_linear_calls(dumped("after.py"))
    assert KERNELS["zen_w4_avx2"].reads == 3
    counts = re.search(r"\], (\[[\d, ]+\]), ", call).group(1)
    assert all(c == 3 for c in json.loads(counts)), call
