"""Int8 x int8 linears on the model's own weight: the [N, K] int8 codes and [N] scales that
torchao's dynamic-activation formats keep (per-channel, symmetric), read where they are. The
layout is no packing at all, so prefill and decode on it add no bytes to the model: ATen's
``_int_mm`` (oneDNN's) on W^T as a view for many rows, our C++ GEMV (csrc/a8w8_rows.h, built for
AVX2 and for AVX512-VNNI) for few. All quantize x as the model does, int8 per row: their outputs
are the model's own."""
from __future__ import annotations

from typing import Optional

import torch

from .contract import Kernel, Unsuited
from .native_entry import NativeLinear
from .weights import LinearSpec, QuantWeight


def _supports(spec: LinearSpec) -> Optional[str]:
    if not spec.dynamic_activation or spec.bits > 8:
        return Unsuited("not for weight-only linears")
    if spec.group_size != spec.k or not spec.symmetric:
        return "per-channel symmetric weights only"
    if spec.act_dtype not in (torch.bfloat16, torch.float32):
        return f"{spec.act_dtype} activations"
    return None


def _rows_supports(spec: LinearSpec) -> Optional[str]:
    if reason := _supports(spec):
        return reason
    if spec.k % 32:
        return f"K={spec.k} is not a multiple of 32"
    if spec.out_n % 8:
        return f"N={spec.out_n} is not a multiple of 8 (the kernel's output tiles)"
    return None


def _prepack(w: QuantWeight, act_dtype):
    # views of the reading, which aliases the model's codes: no copy (a bf16 scale, [N] numbers, is made fp32)
    return [w.codes.contiguous(), w.scale[:, 0].to(torch.float32).contiguous()]


def _int_mm_run(x, packed, bias, spec):
    # per-row symmetric int8 activations (as torchao's Int8DynamicActivation), int32 accumulate;
    # oneDNN reads W^T as a view of the [N, K] rows as fast as a transposed copy (AMX Xeon, 128-2048 rows)
    codes, w_scale = packed
    xf = x.to(torch.float32)
    x_scale = xf.abs().amax(dim=1, keepdim=True).clamp_min(1e-7) / 127.0
    xq = torch.round(xf / x_scale).clamp_(-127, 127).to(torch.int8)
    y = torch._int_mm(xq, codes.t()).to(torch.float32).mul_(x_scale).mul_(w_scale)
    if bias is not None:
        y += bias
    return y.to(x.dtype)


def _rows_arguments(packed, spec):
    return packed[:2], (spec.k,), ()


KERNELS = (
    Kernel("aten_int_mm_da8", "aten", _supports, _prepack, _int_mm_run, layout="int8_rows", own_weight=True, rank=(2, 22),
           fast_with="int8_gemm", activations="int8 per row"),
    Kernel("zen_a8w8_rows_avx2", "zen", _rows_supports, _prepack, NativeLinear("a8w8_rows_avx2", _rows_arguments),
           layout="int8_rows", own_weight=True, epilogues=("swiglu",), max_m=16, rank=(1, 30), activations="int8 per row"),
    Kernel("zen_a8w8_rows_avx512", "zen", _rows_supports, _prepack, NativeLinear("a8w8_rows_avx512", _rows_arguments),
           layout="int8_rows", own_weight=True, epilogues=("swiglu",), max_m=16, rank=(0, 29), activations="int8 per row"),
)
