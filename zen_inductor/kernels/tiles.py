"""Our C++ kernels on packed tiles of quantized weights (``csrc/``): weight-only int4 and int8
GEMVs for AVX2 and their AVX512-VNNI siblings (which serve every M), int8 activations x int4
weights (AVX2) and x int4 or int8 weights (AVX512-VNNI), and the tiles dequantized block by block
into an fp32 GEMM.

Layouts (one packed copy serves every kernel of a layout):
  int4_tiles, int8_tiles: tiles of 8 output rows, codes in blocks of 64 (``csrc/woq_avx2.cpp``),
      scales and offsets per group beside each tile, [N/8, K/G, 8];
  int4_blocks16, int8_blocks16: blocks of 16 rows, one record per group with its scales inside
      (``csrc/woq_avx512.cpp``).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .. import config, native
from ..allocator import empty_for_packing
from .contract import BF16_GEMM_COPY, Kernel, Unsuited
from .native_entry import NativeLinear
from . import weights
from .weights import LinearSpec, QuantWeight

def _tile_layout_reason(spec: LinearSpec) -> Optional[str]:
    """Why a weight cannot take the tile layout of csrc/ (8-row tiles, groups of 32, 64 or 128)."""
    if spec.group_size == 32 and spec.k % 64:
        # GGUF's blocks of 32: codes stay in blocks of 64 (two groups), so K must hold whole blocks
        return f"group size 32 with K={spec.k}: the tile layout packs codes in blocks of 64 (K a multiple of 64)"
    if spec.group_size != 32 and (spec.group_size % 64 or spec.k % spec.group_size):
        return f"group size {spec.group_size} with K={spec.k}: the tile layout takes groups that are multiples of 64"
    if spec.n % 8:
        return f"N={spec.n} is not a multiple of 8"
    if spec.act_dtype not in (torch.bfloat16, torch.float32):
        return f"{spec.act_dtype} activations"
    return None


def _bits_reason(spec: LinearSpec, bits: int) -> Optional[str]:
    if spec.bits == bits:
        return None
    return Unsuited("not for dense weights" if spec.bits > 8 else f"not for int{spec.bits} weights")


def _a8w4_supports(spec: LinearSpec) -> Optional[str]:
    if spec.bits == 4 and not spec.dynamic_activation and not config.int8_activations_for_weight_only:
        return Unsuited("not for weight-only linears: it quantizes activations (config.int8_activations_for_weight_only)")
    reason = _bits_reason(spec, 4) or _tile_layout_reason(spec)
    if reason is None and spec.group_size == 32:  # the tiles then hold two groups a 64-code block
        return "group size 32: zen_a8w4_avx2 takes groups that are multiples of 64"
    return reason


def _a8w4_group(g: int) -> int:
    # The kernel gives x one int8 scale per group. Groups are split into groups of 128 (or 64)
    # that repeat the weight's scale: an outlier channel then coarsens fewer activations (a
    # loud channel in a 256-group cost 29 dB, 128-groups keep 30+), and 16-bit partial sums
    # cannot overflow. Groups of 32 stay (the tiles' codes then come in blocks of two groups).
    return 128 if g % 128 == 0 else 64 if g % 64 == 0 else 32


def _a8w4_prepack(w: QuantWeight, act_dtype):
    n, k = w.n, w.k
    g = _a8w4_group(w.group_size)
    repeat, block = w.group_size // g, max(g, 64)  # codes in blocks of 64 or more: two groups of 32
    # codes in [-8, 7]: + 8 cannot overflow int8, so no wider temporaries (~1 s of a 1B model's packing)
    unsigned = (w.codes + 8).view(torch.uint8).view(n // 8, 8, k // block, block // 64, 2, 32)
    nibbles = (unsigned[..., 1, :] << 4).bitwise_or_(unsigned[..., 0, :])  # code i low, code i + 32 high
    tiles = nibbles.permute(0, 2, 1, 3, 4).contiguous()  # [N/8, K/B, 8, B/2]
    # |sum| <= 8 * 128 fits int16, whose sum is 2x faster here than int32's
    colsum128 = w.codes.view(n, k // g, g).sum(-1, dtype=torch.int16).to(torch.int32).mul_(128)
    return [tiles, *_tile_params(w, repeat), _per_tile(colsum128)]



def _per_tile(t: torch.Tensor, rows: int = 8) -> torch.Tensor:
    """[N, K/G] -> [N/rows, K/G, rows]: the scales of a tile sit next to its codes' stream. Stored
    [K/G, N], a tile's groups were N * 4 bytes apart: a page and a TLB entry each, which cost
    decode 20-60% of the int8 GEMV's bandwidth on wide weights (lm_head N=32000, int4: 2.5x)."""
    return t.reshape(t.shape[0] // rows, rows, t.shape[1]).transpose(1, 2).contiguous()


def _tile_params(w: QuantWeight, repeat: int) -> list:
    """Per-tile scale and offset, each group's repeated ``repeat`` times (groups split for the
    kernels' integer sums)."""
    return [_per_tile(t.repeat_interleave(repeat, dim=1).to(torch.float32)) for t in (w.scale, w.offset)]


def _tile_group(packed, spec) -> int:
    return spec.k // packed[1].shape[1]  # scales are [N/8, K/G, 8]; G as packed, after any split


def _a8w4_arguments(packed, spec):
    group = _tile_group(packed, spec)
    if group == 32:  # two groups a block: not the layout a8w4_avx2.cpp reads
        raise ValueError("zen_a8w4_avx2 does not take weights in groups of 32")
    return packed[:4], (spec.k, group), ()


def _a8_blocks16_supports(spec: LinearSpec, bits: int) -> Optional[str]:
    if spec.dynamic_activation or not config.int8_activations_for_weight_only:
        return Unsuited("for weight-only linears with config.int8_activations_for_weight_only: it quantizes activations")
    return _bits_reason(spec, bits) or _tile_layout_reason(spec)


def _w4_supports(spec: LinearSpec) -> Optional[str]:
    return _bits_reason(spec, 4) or _tile_layout_reason(spec)


def _w8_supports(spec: LinearSpec) -> Optional[str]:
    return _bits_reason(spec, 8) or _tile_layout_reason(spec)


def _int8_tiles_prepack(w: QuantWeight, act_dtype):
    n, k = w.n, w.k
    g = _a8w4_group(w.group_size)
    repeat, block = w.group_size // g, max(g, 64)  # blocks of 64 codes or more, as the int4 tiles
    tiles = w.codes.view(n // 8, 8, k // block, block).permute(0, 2, 1, 3).contiguous()  # [N/8, K/B, 8, B]
    return [tiles, *_tile_params(w, repeat)]


def _blocks16_prepack(w: QuantWeight, act_dtype):
    # ceil(N/16) blocks of K/G records (csrc/woq_avx512.cpp): unsigned codes u = c + z in 64-byte
    # lines of 16 rows and, for grouped weights, scales and offset - z scale [16] fp32 each (a
    # symmetric weight's scales alone: the kernel knows its offsets are -z scale); per-channel
    # scales and offsets [ceil(N/16), 16] apart
    k, pad, bits = w.k, -w.n % 16, w.bits
    g = _a8w4_group(w.group_size)
    z = 8 if bits == 4 else 128
    # int8: c + 128 is c's bits with the sign bit flipped; int4 codes in [-8, 7] take + 8 in int8
    u = w.codes.view(torch.uint8) ^ 0x80 if bits == 8 else (w.codes + 8).view(torch.uint8)
    u = torch.nn.functional.pad(u, (0, 0, 0, pad))  # padded rows get zero scales: they add nothing
    blocks = u.shape[0] // 16
    if bits == 8:  # a row's 4 bytes in a line: k .. k + 3
        lines = u.view(blocks, 16, k // g, g // 4, 4)
    else:  # byte j: k + j in the low nibble, k + 4 + j in the high one
        pairs = u.view(blocks, 16, k // g, g // 8, 2, 4)
        lines = pairs[..., 0, :] | (pairs[..., 1, :] << 4)
    records = [lines.permute(0, 2, 3, 1, 4).reshape(blocks, k // g, -1)]
    scale = torch.nn.functional.pad(w.scale.to(torch.float32), (0, 0, 0, pad))
    offset = torch.nn.functional.pad(w.offset.to(torch.float32), (0, 0, 0, pad)) - z * scale
    if w.group_size < k:
        # float16 where it holds every value exactly (GGUF's d and m, Q4_0's -8 d): a sixth fewer
        # bytes to read at G = 32, the same arithmetic
        stored = (scale,) if w.symmetric else (scale, offset)
        tails = [t.to(torch.float16) for t in stored]
        if not all(torch.equal(t16.to(torch.float32), t) for t16, t in zip(tails, stored)):
            tails = list(stored)
        for t in tails:  # [N + pad, K/Gw] -> [ceil(N/16), K/G, 64 or 32 bytes]
            records.append(_per_tile(t.repeat_interleave(w.group_size // g, dim=1), rows=16).view(torch.uint8))
        params = [torch.empty(0)] * 2  # (the kernel reads the records' own)
    else:
        params = [scale.view(blocks, 16), offset.view(blocks, 16)]
    out = empty_for_packing((blocks, k // g, sum(r.shape[2] for r in records)), torch.uint8)
    return [torch.cat(records, dim=2, out=out), *params]


def _blocks16_arguments(packed, spec):
    records, scale = packed[0], packed[1]
    group = spec.k // records.shape[1]
    if scale.numel():
        tails = 0  # per channel
    else:  # a record's codes, then its [16] scales and offsets: fp32 (1) or float16 (2); scales alone (3, 4)
        tail_bytes = records.shape[2] - group * 16 * spec.bits // 8
        tails = {(False, 128): 1, (False, 64): 2, (True, 64): 3, (True, 32): 4}[spec.symmetric, tail_bytes]
    return packed[:3], (spec.k, group), (spec.bits, tails)


def _woq_arguments(packed, spec):
    return packed[:3], (spec.k, _tile_group(packed, spec)), (spec.bits,)


def _tiles_supports(spec: LinearSpec, bits: int) -> Optional[str]:
    return _bits_reason(spec, bits) or _tile_layout_reason(spec)


def _tiles_sgemm_run(x, packed, bias, spec):
    # fp32 GEMM on a weight dequantized per call by our C++ (about 10x faster than doing it
    # with torch ops), from the same packed copy as the GEMV kernels of its layout
    tiles, scale, offset = packed[:3]
    group, dequantize = _tile_group(packed, spec), native.load("tiles_dequant")

    def make_rows(out, start, end):
        t0, t1 = start // 8, end // 8
        dequantize(tiles[t0:t1], scale[t0:t1], offset[t0:t1], out, end - start, spec.k, group, spec.bits)

    return weights.sgemm_by_row_blocks(x, spec.n, spec.k, make_rows, bias)


_WOQ_AVX2 = NativeLinear("woq_avx2", _woq_arguments)
_WOQ_AVX512 = NativeLinear("woq_avx512", _blocks16_arguments)
_A8_AVX512 = NativeLinear("woq_a8_avx512", _blocks16_arguments)

KERNELS = (
    Kernel("zen_a8w4_avx2", "zen", _a8w4_supports, _a8w4_prepack, NativeLinear("a8w4_avx2", _a8w4_arguments), layout="int4_tiles",
           epilogues=("swiglu",), rank=(-1, -1), activations="int8 per group"),
    # where the AVX-512 siblings and the bf16 copy's GEMM serve, these win no bin: even or behind
    # at M=1-4, 1.3-2.5x behind the copy from M=16 (linears-llama1b-4l.md)
    Kernel("zen_w4_avx2", "zen", _w4_supports, _a8w4_prepack, _WOQ_AVX2, layout="int4_tiles", epilogues=("swiglu",),
           dominated_by=(("zen_w4_avx512", "zentorch_linear_dequantized"),), rank=(4, 24), reads=3),
    Kernel("zen_w8_avx2", "zen", _w8_supports, _int8_tiles_prepack, _WOQ_AVX2, layout="int8_tiles", epilogues=("swiglu",),
           dominated_by=(("zen_w8_avx512", "zentorch_linear_dequantized"),), rank=(4, 24)),
    # AVX512-VNNI, 16-row blocks in 4 streams a thread, as zen_bf16_gemv_avx512; for every M: at
    # M=16-512 on SmolLM2's fp32 G=32 shapes 1.4-2x ahead of the tiles' fp32 GEMMs (int8) and
    # 2-3x (int4) on Zen 4, the weight's one copy serving prefill and decode
    Kernel("zen_w4_avx512", "zen", _w4_supports, _blocks16_prepack, _WOQ_AVX512, layout="int4_blocks16",
           epilogues=("swiglu",), rank=(0, 20)),
    Kernel("zen_w8_avx512", "zen", _w8_supports, _blocks16_prepack, _WOQ_AVX512, layout="int8_blocks16",
           epilogues=("swiglu",), rank=(0, 20)),
    # the same blocks on x in int8 per group (llama.cpp's arithmetic for Q4/Q8 blocks): one
    # vpdpbusd per four codes instead of two, another 1.5-1.8x at M=16-512 (45 dB on random data)
    Kernel("zen_a8w4_avx512", "zen", functools.partial(_a8_blocks16_supports, bits=4), _blocks16_prepack, _A8_AVX512,
           layout="int4_blocks16", epilogues=("swiglu",), rank=(-1, -1), activations="int8 per group"),
    Kernel("zen_a8w8_avx512", "zen", functools.partial(_a8_blocks16_supports, bits=8), _blocks16_prepack, _A8_AVX512,
           layout="int8_blocks16", epilogues=("swiglu",), rank=(-1, -1), activations="int8 per group"),
    # with a native bf16 GEMM the bf16 copy's GEMM is 2-10x ahead of these fp32 GEMMs on weights
    # dequantized per call, in all 30 (shape, M) cells of the int4 and int8 llama1b linears on Zen 4
    Kernel("int4_tiles_sgemm", "torch", functools.partial(_tiles_supports, bits=4), _a8w4_prepack, _tiles_sgemm_run,
           layout="int4_tiles", native="tiles_dequant", dominated_by=BF16_GEMM_COPY, rank=(22, 2), reads=3),
    Kernel("int8_tiles_sgemm", "torch", functools.partial(_tiles_supports, bits=8), _int8_tiles_prepack, _tiles_sgemm_run,
           layout="int8_tiles", native="tiles_dequant", dominated_by=BF16_GEMM_COPY, rank=(22, 2)),
)
