"""Epilogues: what a linear computes on its output before it is stored (swiglu: silu(gate) * up).

Kernels that fuse an epilogue list it in ``Kernel.epilogues``; for the others ``apply_epilogue``
runs it on their plain output.
"""
from __future__ import annotations

import torch

from .. import native
from .weights import LinearSpec


SWIGLU_BLOCK = 8  # rows of gate, then of up, in turn in a swiglu weight (the kernels' tile height)
SWIGLU_NATIVE = "swiglu_avx2"  # the library apply_epilogue runs swiglu with, where it builds


def swiglu_row_order(n_out: int) -> torch.Tensor:
    """Rows of ``cat([gate, up])`` (each ``n_out`` rows) in the order a swiglu linear keeps them."""
    blocks = torch.arange(n_out).view(n_out // SWIGLU_BLOCK, SWIGLU_BLOCK)
    return torch.stack([blocks, blocks + n_out], dim=1).reshape(-1)


def apply_epilogue(y: torch.Tensor, spec: LinearSpec) -> torch.Tensor:
    """The epilogue on a kernel's plain output ``[M, spec.n]``, for kernels that do not fuse it.

    swiglu: ``silu(gate) * up`` in fp32, rounded once; the rows of W (so the columns of y) come
    as gate and up blocks in turn (``swiglu_row_order``). One pass of our C++ where it builds
    (0.78 ms at M=128, 8192 outputs, against 2.4 ms for ``epilogue_reference``'s ATen ops;
    bit-identical on 1 M outputs), those ops otherwise.
    """
    if spec.epilogue != "swiglu" or y.dtype not in (torch.bfloat16, torch.float32) or native.unavailable(SWIGLU_NATIVE):
        return epilogue_reference(y, spec)
    y = y.contiguous()
    out = torch.empty((y.shape[0], spec.out_n), dtype=y.dtype)
    if y.shape[0]:
        bf16 = int(y.dtype == torch.bfloat16)
        native.load(SWIGLU_NATIVE)(y, out, y.shape[0], spec.out_n, bf16, bf16)
    return out


def epilogue_reference(y: torch.Tensor, spec: LinearSpec) -> torch.Tensor:
    """``apply_epilogue`` by ATen ops: the fallback, and the verifier's reference (which must not
    be computed by the code it checks)."""
    if spec.epilogue != "swiglu":
        return y
    pairs = y.reshape(y.shape[0], spec.out_n // SWIGLU_BLOCK, 2, SWIGLU_BLOCK)
    # gate and up made contiguous in fp32 first: silu on the strided view of one fp32 copy took
    # 2 ms of a bf16 llama1b prefill's 4.6 ms epilogue (M=128, 8192 outputs), this 2.05 ms all told
    # (copy=True: for an fp32 y, ``to`` returned the strided view itself, and silu_ wrote into y)
    gate, up = (pairs[:, :, i].to(torch.float32, memory_format=torch.contiguous_format, copy=True) for i in (0, 1))
    return torch.nn.functional.silu(gate, inplace=True).mul_(up).reshape(y.shape[0], spec.out_n).to(y.dtype)
