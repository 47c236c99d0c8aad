"""Dense (bf16) weights: ATen's GEMM, an fp32 GEMM on a per-call upcast, and our C++ GEMVs
(AVX2: bf16 widened by a shift, on the model's own weight or a blocked copy; AVX512-BF16:
``vdpbf16ps`` on a copy packed as its pairs or on the model's own weight). A copy is made only
where memory allows (``copy_bytes_per_weight``): the model's own weight always serves."""
from __future__ import annotations

import functools
from typing import Optional

import torch

from ..allocator import empty_for_packing
from ..cpu import amx_bf16, native_bf16_gemm
from .contract import BF16_GEMM, Kernel, Unsuited
from .native_entry import NativeLinear
from . import weights
from .weights import DenseWeight, LinearSpec

def _dense_supports(spec: LinearSpec) -> Optional[str]:
    if spec.bits != 16:
        return Unsuited("not for quantized weights")
    if spec.act_dtype != torch.bfloat16:
        return f"{spec.act_dtype} activations"
    return None


def _dense_prepack(w: DenseWeight, act_dtype):
    return [w.weight.contiguous()]  # the model's own [N, K] tensor: no copy


def _bf16_gemv_supports(spec: LinearSpec) -> Optional[str]:
    if spec.k % 8:
        return f"K={spec.k} is not a multiple of 8"
    return _dense_supports(spec)


def _bf16_blocks_prepack(w: DenseWeight, act_dtype):
    # [ceil(N/8), K/8, 8, 8]: 8 rows as one contiguous stream (csrc/bf16_gemv_avx2.cpp); a copy,
    # made only if this kernel wins a bin (packing is lazy)
    padded = torch.nn.functional.pad(w.weight, (0, 0, 0, -w.n % 8))
    return [padded.view(-1, 8, w.k // 8, 8).permute(0, 2, 1, 3).contiguous()]


def _bf16_gemv_arguments(packed, spec, blocks: bool = False):
    # without native bf16 (AVX2) ATen's bf16 GEMV is far from the memory roofline; this one
    # widens bf16 by a shift and streams 8 weight rows at a time
    return packed[:1], (spec.k,), (int(blocks),)


def _bf16_vnni_supports(spec: LinearSpec) -> Optional[str]:
    return _dense_supports(spec) or (f"K={spec.k} is odd (the kernel takes pairs along K)" if spec.k % 2 else None)


def _bf16_vnni_prepack(w: DenseWeight, act_dtype):
    # [ceil(N/16), K/2, 16, 2]: the pairs vdpbf16ps takes, 16 rows as one stream
    # (csrc/bf16_gemv_avx512.cpp); moved as int32 pairs, 1.5x faster than as bf16 [..., 2]
    padded = torch.nn.functional.pad(w.weight, (0, 0, 0, -w.n % 16)).view(torch.int32)
    out = empty_for_packing((padded.shape[0] // 16, w.k // 2, 16), torch.int32)
    out.copy_(padded.view(-1, 16, w.k // 2).transpose(1, 2))
    return [out.view(torch.bfloat16).view(-1, w.k // 2, 16, 2)]


def _bf16_vnni_arguments(packed, spec, plain: bool = False):
    return packed[:1], (spec.k,), (int(plain),)


def _dense_mm_run(x, packed, bias, spec):
    return torch.addmm(bias, x, packed[0].t()) if bias is not None else torch.mm(x, packed[0].t())


def _dense_sgemm_run(x, packed, bias, spec):
    # upcast per call: costs a pass over the weight, pays off once the GEMM is compute-bound on a
    # CPU without native bf16 (measured here at M=64: 19.5 ms bf16 vs 4.6 ms upcast + sgemm)
    weight = packed[0]
    return weights.sgemm_by_row_blocks(x, spec.n, spec.k, lambda out, start, end: out.copy_(weight[start:end]), bias)


KERNELS = (
    # a bf16 GEMM without AVX512-BF16/AMX won none of the 35 bins of the llama1b-4l shapes: 1.1-2x
    # behind zen_bf16_gemv_avx2 at M=1-16, 2.5-7x behind dense_sgemm from M=64
    # where the CPU has AMX this is oneDNN's AMX GEMM: 2.2-2.4x zentorch's at M=16, 5-10x from M=64
    Kernel("dense_mm", "dense", _dense_supports, _dense_prepack, _dense_mm_run, layout="dense", own_weight=True,
           dominated_by=(() if amx_bf16() else ("zentorch_linear",))
           + (() if native_bf16_gemm() else (("zen_bf16_gemv_avx2", "dense_sgemm"),)),
           rank=(4, -1) if amx_bf16() else (4, 1), fast_with="bf16_gemm"),
    # for CPUs without a native bf16 GEMM: on Zen 4 zentorch_linear was 2.5-5x ahead at every M
    Kernel("dense_sgemm", "dense", _dense_supports, _dense_prepack, _dense_sgemm_run, layout="dense", own_weight=True,
           dominated_by=BF16_GEMM, rank=(20, 2)),
    # one row of x at a time against each block of W: past M=64 a GEMM is ahead (dense_sgemm
    # 1.2-2.1x at M=256 on the llama1b shapes); where zentorch's AVX512-BF16 GEMM serves it is
    # behind from M=2 and a bf16 decode ran faster without both GEMVs, so they are left out there
    Kernel("zen_bf16_gemv_avx2", "dense", _bf16_gemv_supports, _dense_prepack, NativeLinear("bf16_gemv_avx2", _bf16_gemv_arguments), layout="dense", own_weight=True,
           epilogues=("swiglu",), max_m=64, dominated_by=BF16_GEMM, rank=(3, 23)),
    # AVX512-BF16: 16 rows of W as one stream, 4 streams a thread; 0.82-0.85x zentorch's GEMM on
    # the llama1b-4l decode linears. At M=16 four passes over each block make it compute-bound
    Kernel("zen_bf16_gemv_avx512", "dense", _bf16_vnni_supports, _bf16_vnni_prepack, NativeLinear("bf16_gemv_avx512", _bf16_vnni_arguments),
           layout="bf16_vnni", epilogues=("swiglu",), max_m=4, rank=(0, 20), copy_bytes_per_weight=2),
    # the same instructions on the model's own row-major weight: no copy the model's size again.
    # 0.95-1.1x the packed one's time at M=1, 1.0-1.2x at M=4 (Zen 4, llama1b-4l and SmolLM2
    # shapes), so within config.layout_tolerance it takes the bin and the copy is never made
    Kernel("zen_bf16_rows_avx512", "dense", _bf16_vnni_supports, _dense_prepack,
           NativeLinear("bf16_gemv_avx512", functools.partial(_bf16_vnni_arguments, plain=True)), layout="dense", own_weight=True,
           epilogues=("swiglu",), max_m=4, rank=(1, 21)),
    # the AVX2 GEMV on a blocked copy: ahead where rows of W are short (K ~ 1024)
    Kernel("zen_bf16_blocks_avx2", "dense", _bf16_gemv_supports, _bf16_blocks_prepack,
           NativeLinear("bf16_gemv_avx2", functools.partial(_bf16_gemv_arguments, blocks=True)), layout="bf16_blocks",
           epilogues=("swiglu",), max_m=64, dominated_by=BF16_GEMM, rank=(2, 22), copy_bytes_per_weight=2),
)
