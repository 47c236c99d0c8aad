"""How our C++ kernels are called: one calling convention for every native entry."""
from __future__ import annotations

import torch

from .. import native


def run_native(name: str, x, weight: list, bias, spec, dims: tuple, extra: tuple = (), residual=None):
    """``y = x @ W^T (+ bias)``, then the epilogue, by the native kernel ``name``, whose entry
    takes ``(x, *weight, bias, y, M, N, *dims, x_bf16, y_bf16, has_bias, *extra, swiglu, residual,
    has_residual)``; with a residual y is ``residual + y`` in fp32 (no epilogue then)."""
    if not x.is_contiguous():
        x = x.contiguous()
    bias, residual = fp32_contiguous(bias), fp32_contiguous(residual)
    y = torch.empty((x.shape[0], spec.out_n), dtype=x.dtype if residual is None else torch.float32)
    if x.shape[0]:
        native.load(name)(
            x, *weight, weight[0] if bias is None else bias, y, x.shape[0], spec.n, *dims,
            int(x.dtype == torch.bfloat16), int(y.dtype == torch.bfloat16), int(bias is not None), *extra,
            int(spec.epilogue == "swiglu"), *((weight[0], 0) if residual is None else (residual, 1)),
        )
    return y


def fp32_contiguous(t):
    """``t`` as the kernels read it (fp32, rows packed), or None."""
    return t if t is None or (t.dtype == torch.float32 and t.is_contiguous()) else t.to(torch.float32).contiguous()
