"""ATen's quantized GEMMs: int4 packed weights, int8 per-channel weights; and ATen's bf16 GEMM
(oneDNN's) on a bf16 copy of a quantized weight. (ATen's int8 x int8 GEMM is in int8_rows.py,
beside the kernel that shares its layout.)"""
from __future__ import annotations

from typing import Optional

import torch

from .. import config
from ..cpu import amx_bf16, native_bf16_gemm
from .contract import Kernel, Unsuited
from .weights import LinearSpec, QuantWeight

aten = torch.ops.aten

_INT4PACK_GROUPS = (32, 64, 128, 256)


def _int4pack_supports(spec: LinearSpec) -> Optional[str]:
    if spec.bits != 4:
        return Unsuited(f"not for int{spec.bits} weights")
    if spec.group_size not in _INT4PACK_GROUPS:
        return f"group size {spec.group_size} not in {'/'.join(map(str, _INT4PACK_GROUPS))}"
    if spec.k % spec.group_size:
        return f"K={spec.k} not divisible by group size {spec.group_size}"
    if spec.act_dtype not in (torch.bfloat16, torch.float32):
        return f"{spec.act_dtype} activations"
    return None


def _int4pack_prepack(w: QuantWeight, act_dtype):
    unsigned = (w.codes.to(torch.int32) + 8).contiguous()
    packed = aten._convert_weight_to_int4pack_for_cpu(unsigned, 1)
    # the kernel computes (u - 8) * s + z, which is codes * s + offset
    scale_and_zero = torch.stack([w.scale.t(), w.offset.t()], dim=-1).to(act_dtype).contiguous()
    return [packed, scale_and_zero]


def _int4pack_run(x, packed, bias, spec):
    y = aten._weight_int4pack_mm_for_cpu(x, packed[0], spec.group_size, packed[1])
    return y if bias is None else y + bias


def _int8pack_supports(spec: LinearSpec) -> Optional[str]:
    if spec.bits > 8:
        return Unsuited("not for dense weights")
    if spec.group_size != spec.k:
        return f"per-group scales (group size {spec.group_size}); kernel is per-channel only"
    if not spec.symmetric:
        return "zero points; kernel is symmetric only"
    if spec.act_dtype not in (torch.bfloat16, torch.float32):
        return f"{spec.act_dtype} activations"
    return None


def _int8pack_prepack(w: QuantWeight, act_dtype):
    return [w.codes.contiguous(), w.scale[:, 0].to(act_dtype).contiguous()]


def _int8pack_run(x, packed, bias, spec):
    y = aten._weight_int8pack_mm(x, packed[0], packed[1])
    return y if bias is None else y + bias


def _bf16_copy_supports(spec: LinearSpec) -> Optional[str]:
    if spec.bits > 8:
        return Unsuited("not for dense weights: see dense_mm")
    if spec.act_dtype != torch.bfloat16:
        return f"{spec.act_dtype} activations: the copy is for a bf16 GEMM"
    if not config.dequantized_copies:
        return "config.dequantized_copies is off"
    if not native_bf16_gemm():
        return "no native bf16 GEMM on this CPU (AVX512-BF16 or AMX)"
    return None


def _bf16_copy_prepack(w: QuantWeight, act_dtype):
    return [w.dequantize(torch.bfloat16)]


def _bf16_copy_run(x, packed, bias, spec):
    return torch.nn.functional.linear(x, packed[0], bias)


KERNELS = (
    # behind zen_w4_avx2 wherever both serve (benchmarks/results/families-kernels-flags.md); its
    # packing and verification cost ~1.7 s of a cold int4 compile
    Kernel("aten_int4pack_mm", "aten", _int4pack_supports, _int4pack_prepack, _int4pack_run,
           dominated_by=("zen_w4_avx2", "zen_w4_avx512"), rank=(6, 26)),
    # behind zen_w8_avx512 at M <= 16 and the bf16 copy's GEMM from M=64: it won no int8 bin
    # (linears-llama1b-4l.md), and its verification took ~1.2 s of a cold int8 compile
    Kernel("aten_int8pack_mm", "aten", _int8pack_supports, _int8pack_prepack, _int8pack_run,
           dominated_by=(("zen_w8_avx512", "zentorch_linear_dequantized"),), rank=(6, 26), own_weight=True),
    # on a Xeon with AMX, oneDNN's bf16 GEMM ran 2.2-2.4x zentorch's at M=16 and 5-10x from M=64
    # (llama1b and SmolLM2 shapes; zentorch 1.1-1.8x ahead at M <= 4, where our GEMVs serve)
    Kernel("aten_linear_dequantized", "torch", _bf16_copy_supports, _bf16_copy_prepack, _bf16_copy_run,
           layout="bf16_rows", rank=(21, -1) if amx_bf16() else (21, 1), fast_with="bf16_gemm", copy_bytes_per_weight=2),
)
