"""Property-based: a weight-only quantized linear, whatever it meets, compiled by zen gives the fp32
reference's answer at the weight-only bar (40 dB), or fails no differently from eager.

Drawn: bits (4, 8), symmetric or not, group (32, 64, 128, or the whole row), K a multiple of it,
N from 1 (not a multiple of 8 or 16 most of the time), a bias or not, bf16 / fp16 / fp32
activations, 1 to 3 leading dims of sizes 1-9 (M = 1, odd, prime, ...), and the input as packed
rows, transposed, a slice of a wider tensor, every other row, or expanded (a broadcast view).

CI runs a fixed, seeded profile ("ci", a dozen examples); the long one runs on demand:
    HYPOTHESIS_PROFILE=long python -m pytest -q tests/test_properties.py
"""
import os

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import zen_inductor

from conftest import compile_zen, quantize, sqnr
from quantized import fp32_weight

settings.register_profile("ci", max_examples=12, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("long", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

LAYOUTS = ("packed", "transposed", "sliced", "every_other_row", "expanded")


@st.composite
def linears(draw):
    bits = draw(st.sampled_from([4, 8]))
    group = draw(st.sampled_from([32, 64, 128, None]))  # None: one group a row (per channel)
    k = (group or 32) * draw(st.integers(1, 6))
    return dict(bits=bits, symmetric=draw(st.booleans()), group=group, k=k, n=draw(st.integers(1, 200)),
                bias=draw(st.booleans()), dtype=draw(st.sampled_from([torch.bfloat16, torch.float16, torch.float32])),
                lead=tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=3))), layout=draw(st.sampled_from(LAYOUTS)),
                seed=draw(st.integers(0, 2**16)))


def _input(case):
    k, lead, dtype, layout = case["k"], case["lead"], case["dtype"], case["layout"]
    if layout == "transposed":  # the last two dims swapped: K is not the innermost in memory
        return torch.randn(*lead[:-1], k, lead[-1]).to(dtype).transpose(-1, -2)
    if layout == "sliced":
        return torch.randn(*lead, 2 * k + 3).to(dtype)[..., 3:3 + k]
    if layout == "every_other_row":
        return torch.randn(*lead[:-1], 2 * lead[-1], k).to(dtype)[..., ::2, :]
    if layout == "expanded":  # the same row broadcast over the leading dims
        return torch.randn(k).to(dtype).expand(*lead, k)
    return torch.randn(*lead, k).to(dtype)


@given(linears())
def test_a_quantized_linear_meets_anything(case):
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType

    torch._dynamo.reset()
    zen_inductor.counters.clear()
    torch.manual_seed(case["seed"])
    model = torch.nn.Sequential(torch.nn.Linear(case["k"], case["n"], bias=case["bias"])).to(case["dtype"]).eval()
    cfg = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{case['bits']}"),
                               granularity=PerGroup(case["group"]) if case["group"] else PerAxis(0),
                               mapping_type=MappingType.SYMMETRIC if case["symmetric"] else MappingType.ASYMMETRIC)
    model = quantize(model, cfg)
    x = _input(case)
    ref = x.float() @ fp32_weight(model[0].weight).t()
    if case["bias"]:
        ref = ref + model[0].bias.float()
    with torch.no_grad():
        y = compile_zen(model)(x)
    assert y.shape == ref.shape and y.dtype == case["dtype"], case
    assert torch.isfinite(y).all(), case
    assert sqnr(y, ref) >= 40, (case, sqnr(y, ref), zen_inductor.last_report())
    # which path served it (--hypothesis-show-statistics): one of zen's kernels, or left to Inductor
    event("a zen kernel" if zen_inductor.counters["dequant_matmul"] else "left to Inductor")
