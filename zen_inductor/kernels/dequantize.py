"""Dequantize per call, then a dense GEMM: the fallbacks that take any quantized weight."""
from __future__ import annotations

from typing import Optional

import torch

from .. import config
from ..cpu import native_bf16_gemm
from .contract import BF16_GEMM_COPY, Kernel, Unsuited
from .weights import LinearSpec, QuantWeight

def _dequant_supports(spec: LinearSpec) -> Optional[str]:
    if spec.bits > 8:
        return Unsuited("not for dense weights")
    if spec.act_dtype not in (torch.bfloat16, torch.float32):
        return f"{spec.act_dtype} activations"
    return None


def _dequant_prepack(w: QuantWeight, act_dtype):
    codes = w.codes.contiguous()
    if w.bits == 4 and w.k % 2 == 0:  # two codes a byte: the compiled model keeps 0.5 B/weight
        unsigned = (codes + 8).to(torch.uint8).view(w.n, w.k // 2, 2)
        codes = unsigned[..., 0] | (unsigned[..., 1] << 4)
    return [codes, w.scale.contiguous(), w.offset.contiguous()]


def _dequantized(packed, spec) -> torch.Tensor:
    codes, scale, offset = packed
    n, k, g = spec.n, spec.k, spec.group_size
    if codes.dtype == torch.uint8:  # nibbles, low first
        codes = torch.stack([codes & 15, codes >> 4], dim=-1).view(n, k).to(torch.float32) - 8
    return (codes.view(n, k // g, g).to(torch.float32) * scale[..., None] + offset[..., None]).view(n, k)


def _dequant_gemm_run(x, packed, bias, spec):
    # GEMM in the activation dtype: fastest where the CPU has native bf16 (AVX512-BF16, AMX)
    w = _dequantized(packed, spec).to(x.dtype)
    return torch.addmm(bias, x, w.t()) if bias is not None else torch.mm(x, w.t())


def _dequant_sgemm_run(x, packed, bias, spec):
    # fp32 GEMM: without native bf16 (AVX2) a bf16 GEMM runs 5-7x slower than sgemm here
    y = torch.mm(x.to(torch.float32), _dequantized(packed, spec).t())
    if bias is not None:
        y += bias
    return y.to(x.dtype)


def _dequant_bf16_supports(spec: LinearSpec) -> Optional[str]:
    reason = _dequant_supports(spec) or (None if spec.act_dtype == torch.bfloat16 else "fp32 activations: see dequant_sgemm")
    if reason is None and config.prune_dominated_kernels and not native_bf16_gemm():
        # measured here: a bf16 GEMM without AVX512-BF16/AMX runs 5-7x slower than the fp32 one
        # of dequant_sgemm, and verifying and timing it cost seconds of compile per big linear
        return "no native bf16 GEMM on this CPU (AVX512-BF16 or AMX): dequant_sgemm is faster"
    return reason



KERNELS = (
    # measured on Zen 4, 1.7-2x behind the bf16 copy's GEMM in every bin of the llama1b shapes, and
    # verifying it cost ~3 s of a cold compile
    Kernel("dequant_gemm", "torch", _dequant_bf16_supports, _dequant_prepack, _dequant_gemm_run,
           dominated_by=("zentorch_linear_dequantized", "aten_linear_dequantized"), rank=(21, 1), fast_with="bf16_gemm"),
    # int4/int8_tiles_sgemm: the same fp32 GEMM, the weight dequantized by C++ ~10x faster
    Kernel("dequant_sgemm", "torch", _dequant_supports, _dequant_prepack, _dequant_sgemm_run,
           dominated_by=("int4_tiles_sgemm", "int8_tiles_sgemm") + BF16_GEMM_COPY, rank=(23, 3)),
)
