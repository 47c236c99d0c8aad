"""SQNR of every matched linear form against the fp32 reference (dequantize exactly, matmul in fp32).

    python benchmarks/accuracy.py        # writes benchmarks/results/accuracy.md

Same modules as the tests (tests/test_dequant_matmul.py), one compile each, eager's SQNR beside.
"""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import zen_inductor  # noqa: E402
from conftest import quantize, sqnr  # noqa: E402
from test_dequant_matmul import K, TORCHAO, GPTQPacked, HandDequant, _linear, _reference  # noqa: E402


def measure(name, model, x, weight, bias):
    torch._dynamo.reset()
    zen_inductor.counters.clear()
    with torch.no_grad():
        eager = model(x)
        y = torch.compile(model, backend="zen")(x)
    ref = _reference(x, weight, bias)
    variants = [k for k in zen_inductor.counters if k.startswith("dequant_matmul.")]
    kernels = sorted(set(zen_inductor.last_report()["matches"][0]["kernels"].values())) if zen_inductor.last_report()["matches"] else []
    return f"| {name} | {', '.join(variants) or 'not matched'} | {sqnr(y, ref):.1f} | {sqnr(eager, ref):.1f} | {', '.join(kernels)} |"


def main():
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

    rows = []
    x = torch.randn(4, 16, K, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    for name in sorted(TORCHAO):
        m = quantize(_linear(), TORCHAO[name][0]())
        rows.append(measure(f"torchao {name}", m, x, m[0].weight.dequantize(), m[0].bias))
    m = quantize(_linear(), Int8DynamicActivationInt8WeightConfig())
    rows.append(measure("torchao int8 dyn act x int8", m, x, m[0].weight.dequantize(), m[0].bias))
    for mapping in ("SYMMETRIC", "ASYMMETRIC"):
        m = quantize(_linear(), Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=PerGroup(128), weight_mapping_type=getattr(MappingType, mapping)))
        rows.append(measure(f"torchao int8 dyn act x int4 g128 {mapping.lower()}", m, x, m[0].weight.dequantize(), m[0].bias))
    m = quantize(_linear(), PrototypeInt4WeightOnlyConfig(group_size=128))
    with torch.no_grad():
        w = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(K, dtype=torch.bfloat16), m[0].weight.qdata, 128, m[0].weight.scale_and_zero).t()
    rows.append(measure("torchao prototype int4 g128", m, x, w, m[0].bias))
    for group, zp, bits, bias in [(None, False, 8, False), (None, True, 4, True), (32, False, 4, False), (128, True, 4, True)]:
        torch.manual_seed(1)
        m = HandDequant(group, zp, bits, bias).eval()
        rows.append(measure(f"hand-written int{bits} {'g' + str(group) if group else 'per-channel'} {'zp' if zp else 'sym'}", m, x, m.reference_weight(), m.bias))
    for zp in (True, False):
        torch.manual_seed(2)
        m = GPTQPacked(64, zp).eval()
        rows.append(measure(f"GPTQ int32-packed int4 g64 {'zp' if zp else 'sym'}", m, x, m.reference_weight(), None))
    torch.manual_seed(3)
    m = HandDequant(64, True, 4).eval()
    m.scale[::17] *= 40
    xo = x.clone()
    xo[..., ::31] *= 20
    rows.append(measure("outliers (40x scales, 20x channels)", m, xo, m.reference_weight(), None))
    text = "\n".join([
        "# SQNR against the fp32 reference (dB), x = [4, 16, 256] bf16, N = 192", "",
        "| case | matched as | zen | eager | kernels chosen (all bins) |", "|---|---|---|---|---|", *rows, "",
        *whole_models()])
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "benchmarks", "results", "accuracy.md"), "w") as f:
        f.write(text)
    print(text)


def whole_models() -> list:
    """Logits of the test suite's small decoders (2 layers, random weights, 16 tokens) against an
    fp32 twin holding the same dequantized weights; zen with and without ``residual_add``."""
    from test_models import FAMILIES, model_and_reference

    rows = ["## Whole models: logits SQNR against the fp32 twin (dB)", "",
            "tests/test_models.py's models. `residual_add` carries the residual stream in fp32 (eager rounds it to bf16",
            "at every add); without it, Inductor's norm kernels recompute the stream from the embedding in fp32, up to",
            "their read limit. With `zentorch_add_rmsnorm` too, zentorch's add + RMSNorm op takes the adds (the stream in bf16,",
            "as in eager).", "",
            "| model | weights | eager | zen | zen, residual_add off | zen, residual_add off, zentorch_add_rmsnorm |",
            "|---|---|---|---|---|---|"]
    for family in sorted(FAMILIES):
        for fmt in ("bf16", "int4"):
            model, ids, ref = model_and_reference(family, fmt)
            with torch.no_grad():
                cells = [sqnr(model(ids).logits, ref)]
                for fold, vendor_norm in ((True, False), (False, False), (False, True)):
                    torch._dynamo.reset()
                    with zen_inductor.config.patch(residual_add=fold, zentorch_add_rmsnorm=vendor_norm):
                        cells.append(sqnr(torch.compile(model, backend="zen")(ids).logits, ref))
            rows.append(f"| {family} | {fmt} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    return rows + [""]


if __name__ == "__main__":
    main()
