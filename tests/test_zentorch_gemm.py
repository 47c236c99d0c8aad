"""zentorch's bf16 GEMM on a prepacked weight: for dense linears, and for a quantized weight's
bf16 copy (dequantized once, at compile time) in the bins where a bf16 GEMM wins (prefill)."""
import pytest
import torch

import zen_inductor
from zen_inductor import config
from zen_inductor.kernels import KERNELS, DenseWeight, LinearSpec, QuantWeight, candidates, run_kernel
from zen_inductor.cpu import amx_bf16, zentorch_unavailable

from conftest import any_rows, compile_zen, sqnr
from quantized import quant_weight

pytestmark = pytest.mark.skipif(zentorch_unavailable() is not None, reason="zentorch needs AVX512-BF16 and VNNI")

N, K = 96, 256


def _quant_weight(bits, group):
    return quant_weight(N, K, bits, group, seed=1)


@pytest.mark.parametrize("fmt,copy", [("bf16", ""), ("int4_g64_asym", "zentorch_linear_dequantized"),
                                      ("int8_pc", "zentorch_linear_dequantized"), ("int4_g64_asym", "aten_linear_dequantized"),
                                      ("int8_pc", "aten_linear_dequantized")])
def test_zentorch_gemm_computes_the_linear(fmt, copy):
    """zentorch's bf16 GEMM, on a dense weight or a bf16 copy of a quantized one; and ATen's (oneDNN's)
    GEMM on such a copy, which the tuner weighs against it."""
    if fmt == "bf16":
        weight = DenseWeight((torch.randn(N, K) * 0.05).to(torch.bfloat16))
        before = weight.weight.clone()
        spec = LinearSpec(n=N, k=K, group_size=K, bits=16, symmetric=True, act_dtype=torch.bfloat16)
        kernel, reference = KERNELS["zentorch_linear"], weight.weight.float()
    else:
        weight = _quant_weight(4, 64) if fmt.startswith("int4") else _quant_weight(8, K)
        before = weight.codes.clone()
        spec = LinearSpec(n=N, k=K, group_size=weight.group_size, bits=weight.bits, symmetric=False, act_dtype=torch.bfloat16)
        kernel, reference = KERNELS[copy], weight.dequantize()
    assert kernel.name in {k.name for k in candidates(spec)[0]}
    packed = kernel.prepack(weight, spec.act_dtype)
    # an unpacked zentorch linear reorders the model's own weight in place (research: zentorch.md 2.6d)
    assert torch.equal(weight.weight if fmt == "bf16" else weight.codes, before)
    bias = torch.randn(N).to(torch.bfloat16)
    for m in (1, 7, 64):
        x = torch.randn(m, K).to(torch.bfloat16)
        for b in (None, bias):
            y = run_kernel(kernel, x, packed, b, spec)
            ref = x.float() @ reference.t() + (b.float() if b is not None else 0)
            assert y.shape == (m, N) and y.dtype == torch.bfloat16
            assert sqnr(y, ref) >= 40, (fmt, m, b is not None)


def test_the_per_call_dequantization_and_unpacked_gemm_are_left_out_for_it():
    quant = LinearSpec(n=N, k=K, group_size=64, bits=4, symmetric=True, act_dtype=torch.bfloat16)
    dense = LinearSpec(n=N, k=K, group_size=K, bits=16, symmetric=True, act_dtype=torch.bfloat16)
    assert candidates(quant)[1]["dequant_gemm"].startswith("zentorch_linear_dequantized computes the same, faster")
    if amx_bf16():  # ATen's GEMM is oneDNN's on AMX tiles, 5-10x zentorch's from M=64
        assert "dense_mm" in {k.name for k in candidates(dense)[0]}
    else:
        assert candidates(dense)[1]["dense_mm"].startswith("zentorch_linear computes the same, faster")
    with config.patch(dequantized_copies=False):
        kernels, excluded = candidates(quant)
        assert "config.dequantized_copies is off" in excluded["zentorch_linear_dequantized"]
        assert "dequant_gemm" in {k.name for k in kernels}  # nothing dominates it now
    with config.patch(use_zentorch=False):
        assert "dense_mm" in {k.name for k in candidates(dense)[0]}


def test_the_prefill_bins_of_a_compiled_linear_run_the_bf16_copy(dumped):
    """By the static rule (dequantize + GEMM from M=257): the dumped graph names the copy's
    kernel in those bins, and a 300-row input through it is right."""
    w = _quant_weight(4, 64)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.codes, self.scale, self.offset = w.codes, w.scale.to(torch.bfloat16), w.offset.to(torch.bfloat16)

        def forward(self, x):
            q = self.codes.view(N, K // 64, 64).to(torch.bfloat16)
            return torch.nn.functional.linear(x, (q * self.scale[..., None] + self.offset[..., None]).view(N, K))

    m = Model().eval()
    x = any_rows(torch.randn(300, K, dtype=torch.bfloat16))
    with torch.no_grad(), config.patch(autotune=False, kernel_allow=("zentorch_linear_dequantized", "zen_w4_avx2")):
        y = compile_zen(m)(x)
    (linear,) = [t for t in zen_inductor.last_report()["autotune"] if "bins" in t]
    winners = {b["bin"]: b["winner"] for b in linear["bins"]}
    assert winners["257-1024"] == winners["1025+"] == "zentorch_linear_dequantized", winners
    assert "zentorch_linear_dequantized" in dumped("after.py")
    ref = x.float() @ (w.codes.view(N, K // 64, 64).float() * m.scale.float()[..., None] + m.offset.float()[..., None]).view(N, K).t()
    assert sqnr(y, ref) >= 40


def test_zentorch_dynamic_int8_gemm_is_offered_up_to_k_2048_where_it_is_right():
    from zen_inductor.verification import sqnr_db

    kernel = KERNELS["zentorch_dynamic_qlinear"]
    for k, right in ((2048, True), (4096, False)):  # N=256: at N=64 it was right at K=4096 too
        spec = LinearSpec(n=256, k=k, group_size=k, bits=8, symmetric=True, act_dtype=torch.bfloat16, dynamic_activation=True)
        offered, excluded = candidates(spec)
        assert (kernel in offered) == right, excluded.get(kernel.name)
        g = torch.Generator().manual_seed(0)
        w = QuantWeight(torch.randint(-127, 128, (256, k), generator=g, dtype=torch.int8), torch.rand(256, 1, generator=g) * 0.01,
                        torch.zeros(256, 1), None, k, 8)
        x = torch.randn(4, k).to(torch.bfloat16)
        db = sqnr_db(run_kernel(kernel, x, kernel.prepack(w, torch.bfloat16), None, spec), x.float() @ w.dequantize().t())
        assert (db >= 30) == right, db  # when this fails for K=4096, zentorch was fixed: lift the limit


def test_zentorch_dynamic_int8_gemm_serves_decode_from_where_it_packed():
    """zentorch's dynamic int8 GEMM knows its prepacked weight by where it lies: a copy of the bytes
    computes garbage (-41 dB). The decode bins' packings go to huge pages, copies, and a plan with
    this kernel at M <= 4 gave -11 dB (an int8 model on an AMX Xeon, where it wins there); its
    packing stays put now, and its timing copies are packings of their own."""
    from conftest import quantize
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    torch.manual_seed(0)
    linear = torch.nn.Linear(2048, 4096, bias=False).to(torch.bfloat16).eval()  # 8 MB: big enough for huge pages
    quantize(linear, Int8DynamicActivationInt8WeightConfig())
    with config.patch(kernel_allow=("zentorch_dynamic_qlinear",)), torch.no_grad():
        compiled = compile_zen(linear)
        compiled(any_rows(torch.randn(4, 2048, dtype=torch.bfloat16)))
        (entry,) = zen_inductor.last_report()["autotune"]
        assert {b["winner"] for b in entry["bins"]} == {"zentorch_dynamic_qlinear"}
        for m in (1, 3, 20):
            x = torch.randn(m, 2048, dtype=torch.bfloat16)
            assert sqnr(compiled(x), linear(x).float()) >= 30, m
    from zen_inductor.timing import weight_copies

    kernel = KERNELS["zentorch_dynamic_qlinear"]
    weight = QuantWeight(linear.weight.qdata, linear.weight.scale, torch.zeros_like(linear.weight.scale), None, 2048, 8)
    spec = LinearSpec(4096, 2048, 2048, 8, True, torch.bfloat16, dynamic_activation=True)
    x = torch.randn(2, 2048, dtype=torch.bfloat16)
    copies = weight_copies(kernel.prepack(weight, torch.bfloat16), 1, lambda: kernel.prepack(weight, torch.bfloat16))
    assert len(copies) > 1
    for packed in copies:
        assert sqnr(run_kernel(kernel, x, packed, None, spec), linear(x).float()) >= 30
