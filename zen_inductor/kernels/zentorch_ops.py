"""zentorch's kernels (AMD's ZenDNN): int4 weight-only GEMM, dynamic int8 GEMM, bf16 GEMM on its
packed layout, and that GEMM on a bf16 copy of a quantized weight dequantized once. They need
AVX-512 (BF16, VNNI): without it they return NaN or garbage with no error, so ``cpu`` is asked
before any is offered."""
from __future__ import annotations

from typing import Optional

import torch

from .. import config
from ..cpu import zentorch_unavailable
from .contract import Kernel, Unsuited
from .weights import LinearSpec, QuantWeight

def _zentorch_woq_supports(spec: LinearSpec) -> Optional[str]:
    if spec.bits != 4:
        return Unsuited("not for this linear: int4 weights only")
    reason = zentorch_unavailable()
    if reason:
        return reason
    if spec.act_dtype != torch.bfloat16:
        return "zentorch WOQ needs bf16 activations"
    if spec.k % 8 or spec.k % spec.group_size:
        return f"K={spec.k} must be a multiple of 8 and of the group size"
    return None


def _zentorch_woq_prepack(w: QuantWeight, act_dtype):
    # zentorch reads raw pointers: scales must be [K/G, N] contiguous, and the weight is passed as
    # the transposed *view* of the repacked tensor (it derives transB from the strides).
    if w.symmetric:
        repacked = torch.ops.zentorch.zentorch_woq_repack_weight(w.codes.contiguous())
        zp = None
    else:
        if w.zero_point is None:
            raise ValueError("zentorch WOQ needs integer zero points")
        repacked = torch.ops.zentorch.zentorch_woq_repack_weight((w.codes.to(torch.int32) + 8).to(torch.int8))
        zp = (w.zero_point.to(torch.int32) + 8).to(torch.int8).t().contiguous()
    packed = [repacked, w.scale.t().to(torch.bfloat16).contiguous()]
    return packed + ([zp] if zp is not None else [])


def _zentorch_woq_run(x, packed, bias, spec):
    zp = packed[2] if len(packed) > 2 else None
    return torch.ops.zentorch.zentorch_woq_linear(x, packed[0].t(), packed[1], zp, bias)


def _zentorch_gemm_reason(spec: LinearSpec) -> Optional[str]:
    if spec.act_dtype != torch.bfloat16:
        return f"{spec.act_dtype} activations: zentorch's GEMM here is bf16"
    return zentorch_unavailable()


def _zentorch_linear_supports(spec: LinearSpec) -> Optional[str]:
    if spec.bits <= 8:
        return Unsuited("not for quantized weights: see zentorch_linear_dequantized")
    return _zentorch_gemm_reason(spec)


def _zentorch_dequantized_supports(spec: LinearSpec) -> Optional[str]:
    if spec.bits > 8:
        return Unsuited("not for dense weights: see zentorch_linear")
    if not config.dequantized_copies:
        return "config.dequantized_copies is off"
    return _zentorch_gemm_reason(spec)


def _zentorch_linear_prepack(w, act_dtype):
    # ZenDNN's blocked layout, made once here (a strided tensor: Inductor's FX graph cache keeps
    # it, where oneDNN's packed weights are opaque and make the cache bypass the graph). The
    # model's weight is read, not reordered in place as an unpacked zentorch_linear_unary does
    dense = w.dequantize(torch.bfloat16) if isinstance(w, QuantWeight) else w.weight.contiguous()
    return [torch.ops.zentorch.zentorch_weight_prepack_for_linear(dense)]


def _zentorch_linear_run(x, packed, bias, spec):
    return torch.ops.zentorch.zentorch_linear_unary(x, packed[0], bias, is_weight_prepacked=True)


def _zentorch_dqlinear_supports(spec: LinearSpec) -> Optional[str]:
    if not spec.dynamic_activation or spec.bits != 8 or spec.group_size != spec.k or not spec.symmetric:
        return Unsuited("not for this linear: per-channel symmetric int8 weights with dynamic activations only")
    if spec.k > 2048:
        # zentorch 2.13.0.2 on its prepacked weight, with no error, from N=128: SQNR -5 dB at K=2112, -13 dB at
        # 3072-8192 against 41 dB at K <= 2048 (either value of its zero-point flag); its unpacked
        # path is right but reorders the caller's weight in place
        return f"K={spec.k}: zentorch's prepacked dynamic int8 GEMM is wrong past K=2048"
    return zentorch_unavailable()


def _zentorch_dqlinear_prepack(w: QuantWeight, act_dtype):
    # prepacked copy: the unpacked path reorders the caller's weight in place (measured)
    packed = torch.ops.zentorch.zentorch_weight_prepack_for_dynamic_qlinear(w.codes.contiguous().clone(), False)
    return [packed, w.scale[:, 0].contiguous()]


def _zentorch_dqlinear_run(x, packed, bias, spec):
    return torch.ops.zentorch.zentorch_dynamic_qlinear(x, packed[0], packed[1], bias, is_weight_prepacked=True)



KERNELS = (
    # where our int4 GEMV and the bf16 copy both serve it won no cell of linears-llama1b-4l.md,
    # yet at the top of the 65-256 bin it timed even with the copy and, chosen there, doubled the
    # int4 prefill (293 ms against 156)
    Kernel("zentorch_woq_linear", "zentorch", _zentorch_woq_supports, _zentorch_woq_prepack, _zentorch_woq_run,
           dominated_by=(("zen_w4_avx2", "zentorch_linear_dequantized"), ("zen_w4_avx512", "zentorch_linear_dequantized")),
           rank=(5, 25)),
    # its packing is a second int8 copy: the model's own rows serve every bin (aten_int_mm_da8 and
    # the rows kernels), so it is made only where memory holds it (1.25x ahead at prefill, Zen 5)
    Kernel("zentorch_dynamic_qlinear", "zentorch", _zentorch_dqlinear_supports, _zentorch_dqlinear_prepack,
           _zentorch_dqlinear_run, rank=(1, 21), fast_with="int8_gemm", activations="int8 per row", pinned=True,
           copy_bytes_per_weight=1),
    # a bf16 copy of the quantized weight for a bf16 GEMM: dequantized once, at compile time
    Kernel("zentorch_linear_dequantized", "torch", _zentorch_dequantized_supports, _zentorch_linear_prepack,
           _zentorch_linear_run, layout="zentorch_dense", rank=(20, 0), copy_bytes_per_weight=2),
    # five llama1b shapes summed on Zen 4: M=1 7.5 ms against 12.5 for torch.mm, M=128 74 against 80
    Kernel("zentorch_linear", "dense", _zentorch_linear_supports, _zentorch_linear_prepack, _zentorch_linear_run,
           layout="zentorch_dense", rank=(1, 0)),
)
