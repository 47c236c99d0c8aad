"""Our ops' fake implementations against what they compute.

Inductor plans the buffers around an op from its fake implementation, and zen compiles without
Inductor's per-call checks of each op's output size and stride (config.runtime_size_asserts):
a fake that disagreed with the op would go unnoticed there. ``torch.library.opcheck`` runs each
op for real and under fake tensors and compares shapes, strides and dtypes.
"""
import pytest
import torch
from torch.library import opcheck

from zen_inductor import attention, native
from zen_inductor.kernels import KERNELS

from test_group32 import _spec, _weight

CHECKS = ("test_schema", "test_faketensor")


def _woq_kernel():
    for name, library in (("zen_w4_avx512", "woq_avx512"), ("zen_w4_avx2", "woq_avx2")):
        if native.unavailable(library) is None:
            return KERNELS[name]
    pytest.skip("no woq library can run here")


@pytest.mark.parametrize("act_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("swiglu,residual,bias", [(False, False, False), (False, True, True), (True, False, False),
                                                  (True, True, False)])
def test_quant_linear_native(act_dtype, m, swiglu, residual, bias):
    kernel = _woq_kernel()
    w = _weight(96, 4, False, seed=4)
    spec = _spec(w, act_dtype, epilogue="swiglu" if swiglu else "")
    call = kernel.run.call(kernel.prepack(w, act_dtype), spec)
    native.load(kernel.native)
    out_n = 48 if swiglu else 96
    x = torch.randn(m, w.k).to(act_dtype)
    kwargs = {"residual": torch.randn(m, out_n)} if residual else {}
    args = (x, list(call.weight), torch.randn(96).to(act_dtype) if bias else None, kernel.native, 96, list(call.dims),
            list(call.extra), swiglu)
    y = torch.ops.zen.quant_linear.native(*args, **kwargs)
    assert y.shape == (m, out_n) and y.dtype == (torch.float32 if residual else act_dtype)
    if residual:  # added to what is stored: the product where swiglu is fused
        plain = torch.ops.zen.quant_linear.native(*args).float()
        assert torch.allclose(y, plain + kwargs["residual"], rtol=0, atol=1e-2 * plain.abs().max().item())
    opcheck(torch.ops.zen.quant_linear.native, args, kwargs, test_utils=CHECKS)


@pytest.mark.skipif(native.unavailable("decode_attention") is not None, reason="decode_attention cannot build here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention(dtype):
    native.load("decode_attention")
    q = torch.randn(1, 9, 1, 64, dtype=dtype)
    k, v = torch.randn(1, 3, 40, 64, dtype=dtype), torch.randn(1, 3, 40, 64, dtype=dtype)
    mask = torch.zeros(1, 1, 1, 40, dtype=dtype)
    mask[..., 30:] = float("-inf")
    opcheck(torch.ops.zen.decode_attention.default, (q, k, v, mask, 0.125), test_utils=CHECKS)
    # q as the graph hands it over: heads and positions transposed out of a [B, 1, H * D] row
    q_view = torch.randn(1, 1, 9, 64, dtype=dtype).transpose(1, 2)
    opcheck(torch.ops.zen.decode_attention.default, (q_view, k, v, mask, 0.125), test_utils=CHECKS)


def test_prefill_attention():
    rows = attention.QUERY_BLOCK + 72  # two blocks of queries, the second partial
    q = torch.randn(1, 9, rows, 64)
    k, v = torch.randn(1, 3, rows + 10, 64), torch.randn(1, 3, rows + 10, 64)
    mask = torch.full((1, 1, rows, rows + 10), float("-inf")).triu(1)
    opcheck(torch.ops.zen.prefill_attention.default, (q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), mask,
                                                      0.125, False), test_utils=CHECKS)


@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("swiglu,residual", [(False, False), (False, True), (True, True)])
def test_quant_linear_by_rows(m, swiglu, residual):
    """One row runs the entry's call, more the plan's. The entry is handed another weight than the
    plan here, so each output says which of the two ran."""
    from zen_inductor.kernels import Plan

    kernel = _woq_kernel()
    native.load(kernel.native)
    w, other = _weight(96, 4, False, seed=4), _weight(96, 4, False, seed=5)
    spec = _spec(w, torch.float32, epilogue="swiglu" if swiglu else "")
    packed = list(kernel.prepack(w, torch.float32))
    call = kernel.run.call(kernel.prepack(other, torch.float32), spec)
    out_n = 48 if swiglu else 96
    x = torch.randn(m, w.k)
    kwargs = {"residual": torch.randn(m, out_n)} if residual else {}
    plan = Plan(spec, (), (kernel.name,)).encode()
    entry = (list(call.weight), None, kernel.native, 96, list(call.dims), list(call.extra), swiglu)
    args = (x, packed, [len(packed)], None, plan, *entry)
    y = torch.ops.zen.quant_linear.by_rows(*args, **kwargs)
    by_entry = torch.ops.zen.quant_linear.native(x, *entry, **kwargs)
    by_plan = torch.ops.zen.quant_linear(x, packed, [len(packed)], None, plan, **kwargs)
    assert not torch.equal(by_entry, by_plan)
    assert torch.equal(y, by_entry if m == 1 else by_plan)
    opcheck(torch.ops.zen.quant_linear.by_rows, args, kwargs, test_utils=CHECKS)


@pytest.mark.skipif(native.unavailable("decode_attention") is not None, reason="decode_attention cannot build here")
@pytest.mark.parametrize("rows", [1, 3])
def test_prefill_attention_by_rows(rows):
    """One query position by decode attention, more by prefill_attention, under the same mask."""
    native.load("decode_attention")
    q = torch.randn(1, 9, rows, 64)
    k, v = torch.randn(1, 3, 40, 64), torch.randn(1, 3, 40, 64)
    mask = torch.full((1, 1, rows, 40), float("-inf"))
    mask[..., :30] = 0
    args = (q, k, v, mask, 0.125, False)
    y = torch.ops.zen.prefill_attention.by_rows(*args)
    expected = (torch.ops.zen.decode_attention(q, k, v, mask, 0.125) if rows == 1
                else torch.ops.zen.prefill_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), mask, 0.125,
                                                     False))
    assert torch.equal(y, expected)
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125, enable_gqa=True)
    assert torch.allclose(y, reference, atol=1e-5)
    opcheck(torch.ops.zen.prefill_attention.by_rows, args, test_utils=CHECKS)
