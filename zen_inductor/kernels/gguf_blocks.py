"""Our C++ kernels on GGUF's Q8_0 blocks as the file stores them: a GEMV (``csrc/q8_0_rows.cpp``)
and a GEMM on panels dequantized from them (``csrc/q8_0_gemm.cpp``).

Layout ``q8_0_rows``: [N, K/32, 34] uint8, a row after another, each block its float16 scale
then its 32 int8 codes: the file's own bytes. Packing a Q8_0 weight writes those bytes back, so
the packed output layer of a tied model is byte for byte the token table the embedding reads:
an ahead-of-time package holds it once (``aot_package``), where the tiles or blocks of the other
int8 kernels are a second copy (SmolLM2-135M: 34 MB beside the table's 29 MB).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..gguf_model import BLOCK, q8_0_blocks
from .contract import Kernel, Unsuited
from .native_entry import NativeLinear
from .weights import LinearSpec, QuantWeight


def _supports(spec: LinearSpec) -> Optional[str]:
    if spec.bits != 8 or spec.dynamic_activation:
        return Unsuited("for int8 weight-only linears in blocks of 32 (GGUF's Q8_0)")
    if spec.group_size != BLOCK or not spec.symmetric:
        return f"{'symmetric' if spec.symmetric else 'asymmetric'} groups of {spec.group_size}: Q8_0 is symmetric in blocks of 32"
    if spec.n % 8 or spec.k % BLOCK:
        return f"N={spec.n}, K={spec.k}: the kernel takes N a multiple of 8 and K of 32"
    if spec.act_dtype not in (torch.bfloat16, torch.float32):
        return f"{spec.act_dtype} activations"
    if spec.epilogue == "swiglu" and spec.n % 16:
        return f"N={spec.n} with swiglu: gate and up come in tiles of 8 rows each"
    return None


def _prepack(w: QuantWeight, act_dtype) -> list:
    if not torch.equal(w.scale.to(torch.float16).to(torch.float32), w.scale.to(torch.float32)):
        raise ValueError("scales are not float16 values: not a Q8_0 weight")
    return [q8_0_blocks(w.codes, w.scale)]


def _arguments(packed, spec):
    # the weight's bits as the one extra word: AOTInductor's proxy executor hands an empty int[]
    # to the op as None ("Expected IntList but got None")
    return packed[:1], (spec.k,), (8,)


KERNELS = (
    # 1.06 bytes a weight, as the VNNI blocks read (the int8 tiles: 1.125, fp32 scales). SmolLM2's
    # output layer (49152 x 576), Zen 4, 2 threads, three copies in turn: 0.91 ms at M = 1 against
    # 1.04 (zen_w8_avx512) and 1.18 (zen_w8_avx2); 1.5 against 1.3 at M = 4, 6.0 against 3.4 at M = 16
    Kernel("zen_q8_0_rows", "zen", _supports, _prepack, NativeLinear("q8_0_rows", _arguments), layout="q8_0_rows",
           epilogues=("swiglu",), rank=(5, 30)),
    # the same bytes dequantized 16 rows at a time into fp32 panels for an FMA GEMM (csrc/q8_0_gemm.cpp),
    # the prefill's kernel where no VNNI serves: SmolLM2's Q8_0 linears at M = 128, Zen 4 capped at
    # AVX2, 0.76-0.79x the GEMV's time and 0.73-0.93x the int8 tiles' dequantize + MKL sgemm
    Kernel("zen_q8_0_gemm", "zen", _supports, _prepack, NativeLinear("q8_0_gemm", _arguments), layout="q8_0_rows",
           epilogues=("swiglu",), rank=(40, 4)),
)
