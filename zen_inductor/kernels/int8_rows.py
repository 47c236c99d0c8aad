"""Int8 x int8 linears on the model's own weight: the [N, K] int8 codes and [N] scales that
torchao's dynamic-activation formats keep (per-channel, symmetric), read where they are. The
layout is no packing at all, so prefill and decode on it add no bytes to the model: ATen's
``_int_mm`` (oneDNN's) on W^T as a view for many rows where the CPU has VNNI, our C++ GEMM
(csrc/int8_gemm_avx2.cpp) where it has not (oneDNN's AVX2 GEMM saturates there), our C++ GEMV
(csrc/a8w8_rows.h, built for AVX2 and for AVX512-VNNI) for few. All quantize x as the model does,
int8 per row, and sum exactly: their outputs are the model's own. A weight concat_linear merged
(q/k/v, gate/up, and gate/up's tiles in turn for the SwiGLU epilogue) is read from the parts'
tensors where they lie: the GEMV follows a table of its 8-row tiles, the GEMMs run a part at a
time."""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .. import cpu, native
from .contract import Kernel, Unsuited
from .epilogues import apply_epilogue
from .native_entry import NativeLinear
from .weights import LinearSpec, QuantWeight, RowSources


def _supports(spec: LinearSpec) -> Optional[str]:
    if not spec.dynamic_activation or spec.bits > 8:
        return Unsuited("not for weight-only linears")
    if spec.group_size != spec.k or not spec.symmetric:
        return "per-channel symmetric weights only"
    if spec.act_dtype not in (torch.bfloat16, torch.float32):
        return f"{spec.act_dtype} activations"
    return None


def _int_mm_supports(spec: LinearSpec) -> Optional[str]:
    if reason := _supports(spec):
        return reason
    if not {"avx512_vnni", "avx_vnni", "amx_int8"} & cpu.flags() or not int_mm_exact():
        return "torch._int_mm without VNNI: oneDNN's GEMM there saturates its 16-bit pair sums (zen_a8w8_gemm_avx2 is exact)"
    return None


def _rows_supports(spec: LinearSpec) -> Optional[str]:
    if reason := _supports(spec):
        return reason
    if spec.k % 32:
        return f"K={spec.k} is not a multiple of 32"
    if spec.out_n % 8:
        return f"N={spec.out_n} is not a multiple of 8 (the kernel's output tiles)"
    return None


# The C++ entry's weight pointers: a merged q/k/v reads three tensors, gate/up two.
MAX_SOURCES = 3
TILE = 8  # rows of W a GEMV tile reads (a8w8_rows.h)
_NONE = torch.empty(0, dtype=torch.int64)


def _tile_table(place: RowSources) -> Optional[torch.Tensor]:
    """Each tile of 8 rows of the weight as (tensor << 32) | first row in that tensor, where
    every tile lies whole in one tensor (concat parts whose N is a multiple of 8; swiglu's gate
    and up blocks of 8 in turn); None where one does not."""
    order = place.row_order()
    if order.numel() % TILE:
        return None
    tiles = order.view(-1, TILE)
    first = tiles[:, 0].contiguous()
    if not torch.equal(tiles, first[:, None] + torch.arange(TILE)):
        return None
    sizes = torch.tensor([t.shape[0] for t in place.tensors])
    ends = sizes.cumsum(0)
    which = torch.searchsorted(ends, first, right=True)
    row = first - (ends - sizes)[which]
    if bool((row + TILE > sizes[which]).any()):
        return None
    return (which << 32) | row


def _prepack(w: QuantWeight, act_dtype):
    """[tiles, scale, W0, W1, W2, order]: W0-W2 the tensors the rows lie in, the model's own where
    the reading is (views: no copy), or the parts of a merged weight (concat, swiglu's reorder);
    the scales in the weight's row order, fp32 (a bf16 scale, [N] numbers, is made fp32)."""
    place = w.in_place_rows()
    tiles = _tile_table(place) if len(place.tensors) <= MAX_SOURCES else None
    if tiles is None and len(place.tensors) > 1:  # rows finer than a tile apart, or too many parts: one copy in order
        place = RowSources((w.codes,))
        tiles = _tile_table(place)
    tensors = [t.contiguous() for t in place.tensors]
    unread = [torch.empty(0, dtype=torch.int8)] * (MAX_SOURCES - len(tensors))
    order = place.order if place.order is not None else _NONE
    return [_NONE if tiles is None else tiles, w.scale[:, 0].to(torch.float32).contiguous(), *tensors, *unread, order]


QUANTIZE_NATIVE = "int8_quantize_rows"  # quantize_rows' one pass, where it builds


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] to int8 as torchao's Int8DynamicActivation does: one symmetric scale a row
    (max |x| / 127), x / scale rounded to nearest even. Codes and the [M, 1] fp32 scales."""
    xf = x.to(torch.float32)
    x_scale = xf.abs().amax(dim=1, keepdim=True).clamp_min(1e-7) / 127.0
    return torch.round(xf / x_scale).clamp_(-127, 127).to(torch.int8), x_scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_rows_reference``'s codes and scales bit for bit, in one pass of our C++ over x
    where it builds (K a multiple of 8): ATen's passes over an fp32 copy cost a 2048-token
    prefill's down projection as much time as its _int_mm."""
    if x.dtype not in (torch.bfloat16, torch.float32) or x.shape[1] % 8 or native.unavailable(QUANTIZE_NATIVE):
        return quantize_rows_reference(x)
    x = x.contiguous()
    xq = torch.empty(x.shape, dtype=torch.int8)
    x_scale = torch.empty((x.shape[0], 1), dtype=torch.float32)
    if x.shape[0]:
        native.load(QUANTIZE_NATIVE)(x, xq, x_scale, x.shape[0], x.shape[1], int(x.dtype == torch.bfloat16))
    return xq, x_scale


def _int_mm_sums(xq: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """xq [M, K] times the rows w [N, K], int32: oneDNN's GEMM (it reads W^T as a view of the rows as
    fast as a transposed copy, AMX Xeon, 128-2048 rows) where its sums are exact, else fp32 GEMMs
    over stretches of K short enough to be exact: the kernel is not offered there, but a plan or a
    test may still run it."""
    if int_mm_exact():
        return torch._int_mm(xq, w.t())
    x32, total = xq.to(torch.float32), None
    for k0 in range(0, xq.shape[1], EXACT_FP32_K):
        part = (x32[:, k0:k0 + EXACT_FP32_K] @ w[:, k0:k0 + EXACT_FP32_K].to(torch.float32).t()).to(torch.int32)
        total = part if total is None else total.add_(part)
    return total


EXACT_FP32_K = 1024  # 1024 * 127 * 128 < 2^24: every partial sum is an integer fp32 holds exactly


@functools.lru_cache(None)
def int_mm_exact() -> bool:
    """Whether torch._int_mm's int32 sums are exact on this machine. Without VNNI, oneDNN's u8 x s8
    GEMM adds two byte products into 16 bits with saturation (vpmaddubsw) and x shifted to u8 (x +
    128) overflows it: 15-49% of the sums came out wrong on Gaussian int8 codes (Zen 5, oneDNN capped
    at AVX2: results/isa-ceilings-zen5.md), all of them on 127s, which this asks."""
    x = torch.full((32, 64), 127, dtype=torch.int8)
    return bool((torch._int_mm(x, x.t()) == 64 * 127 * 127).all())


def _gemm_sums(xq: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The same sums by our C++ (csrc/int8_gemm_avx2.cpp: 16-bit products by vpmaddwd, exact)."""
    xq, w = xq.contiguous(), w.contiguous()  # views where a caller gave them; the kernel reads rows
    sums = torch.empty((xq.shape[0], w.shape[0]), dtype=torch.int32)
    native.load(GEMM_NATIVE)(xq, w, sums, xq.shape[0], w.shape[0], xq.shape[1], torch.get_num_threads())
    return sums


GEMM_NATIVE = "int8_gemm_avx2"


def _int_mm_run(x, packed, bias, spec):
    return _rows_gemm_run(x, packed, bias, spec, _int_mm_sums)


def _gemm_run(x, packed, bias, spec):
    return _rows_gemm_run(x, packed, bias, spec, _gemm_sums)


def _rows_gemm_run(x, packed, bias, spec, sums_of):
    # per-row symmetric int8 activations (as torchao's Int8DynamicActivation), int32 sums a part of
    # the weight (sums_of), then the scales, bias and epilogue in one pass
    _, w_scale, *sources, order = packed
    xq, x_scale = quantize_rows(x)
    sums = [sums_of(xq, w) for w in sources if w.numel()]
    gate = _gate_part(order, len(sums)) if spec.epilogue == "swiglu" else None
    swiglu = gate is not None  # its products give silu(gate) * up where they are
    if swiglu:
        sums = [sums[gate], sums[1 - gate]]
    gathered = not swiglu and (spec.epilogue == "swiglu" or order.numel())  # columns to gather first
    if gathered or any(s.shape[1] % 8 for s in sums) or x.dtype not in (torch.bfloat16, torch.float32) \
            or native.unavailable(EPILOGUE_NATIVE):
        return int_mm_epilogue_reference(sums, swiglu, order, x_scale, w_scale, bias, spec, x.dtype)
    return _int_mm_epilogue(sums, swiglu, x_scale, w_scale, bias, x.dtype)


EPILOGUE_NATIVE = "int8_rows_epilogue"  # _int_mm_epilogue's one pass


def _int_mm_epilogue(sums, swiglu: bool, x_scale, w_scale, bias, dtype):
    """The int32 sums (gate's and up's where ``swiglu``, else the parts side by side) to the
    linear's output in one pass of our C++ (csrc/int8_rows_epilogue.cpp)."""
    rows = x_scale.shape[0]
    n_out = sums[0].shape[1] if swiglu else sum(s.shape[1] for s in sums)
    out = torch.empty((rows, n_out), dtype=dtype)
    if not rows:
        return out
    kernel = native.load(EPILOGUE_NATIVE)
    flags = (int(bias is not None), int(swiglu), int(dtype == torch.bfloat16))
    if swiglu:
        scales = [_half(w_scale, i) for i in (0, 1)]
        biases = [_half(bias, i) for i in (0, 1)] if bias is not None else [_NO_BIAS] * 2
        kernel(*sums, x_scale, *scales, *biases, out, rows, n_out, n_out, 0, *flags)
        return out
    bias = bias.to(torch.float32).contiguous() if bias is not None else _NO_BIAS
    col = 0
    for part in sums:
        kernel(part, part, x_scale, w_scale, w_scale, bias, bias, out, rows, part.shape[1], n_out, col, *flags)
        col += part.shape[1]
    return out


_NO_BIAS = torch.empty(0, dtype=torch.float32)


def int_mm_epilogue_reference(sums, swiglu: bool, order, x_scale, w_scale, bias, spec, dtype):
    """``_int_mm_epilogue`` by ATen ops: the fallback, and the tests' reference. Where not
    ``swiglu``, ``sums`` are the weight's parts side by side, ``order`` the columns to gather."""
    if swiglu:
        pairs = [(rows.to(torch.float32).mul_(x_scale).mul_(_half(w_scale, i)), _half(bias, i)) for i, rows in enumerate(sums)]
        g, u = (y.add_(b) if b is not None else y for y, b in pairs)
        return torch.nn.functional.silu(g, inplace=True).mul_(u).to(dtype)
    acc = sums[0] if len(sums) == 1 else torch.cat(sums, dim=1)
    if order.numel():  # the columns in the weight's row order
        acc = acc.index_select(1, order)
    y = acc.to(torch.float32).mul_(x_scale).mul_(w_scale)
    if bias is not None:
        y += bias
    return apply_epilogue(y, spec).to(dtype)


def _gate_part(order: torch.Tensor, parts: int) -> Optional[int]:
    """Which of two parts is gate, where the weight's rows are 8 of gate's and 8 of up's in turn,
    each part's in its own order (a swiglu linear read from the model's gate and up); else None.
    Its products then give silu(gate) * up as they are: gathered into the weight's order first, the
    columns of gate/up's [128, 16384] product took 2.4 ms more than the 13 ms GEMMs."""
    if parts != 2 or not order.numel() or order.numel() % (2 * TILE):
        return None
    width = order.numel() // 2
    gate = int(order[0]) // width
    halves = order.view(-1, 2, TILE)
    rows = torch.arange(width)
    if torch.equal(halves[:, 0].reshape(-1), rows + gate * width) and torch.equal(halves[:, 1].reshape(-1), rows + (1 - gate) * width):
        return gate
    return None


def _half(values: Optional[torch.Tensor], i: int) -> Optional[torch.Tensor]:
    """Gate's (i = 0) or up's (1) values of a swiglu weight's rows, which go 8 of each in turn."""
    return None if values is None else values.view(-1, 2, TILE)[:, i].reshape(-1).to(torch.float32)


def _rows_arguments(packed, spec):
    return packed[:2 + MAX_SOURCES], (spec.k,), ()


KERNELS = (
    Kernel("aten_int_mm_da8", "aten", _int_mm_supports, _prepack, _int_mm_run, layout="int8_rows", own_weight=True, in_place_rows=True,
           epilogues=("swiglu",), rank=(2, 22), helpers=(QUANTIZE_NATIVE, EPILOGUE_NATIVE),
           fast_with="int8_gemm", activations="int8 per row"),
    Kernel("zen_a8w8_gemm_avx2", "zen", _supports, _prepack, _gemm_run, layout="int8_rows", own_weight=True,
           in_place_rows=True, epilogues=("swiglu",), rank=(3, 23), native=GEMM_NATIVE,
           helpers=(QUANTIZE_NATIVE, EPILOGUE_NATIVE), dominated_by=("aten_int_mm_da8",), activations="int8 per row"),
    Kernel("zen_a8w8_rows_avx2", "zen", _rows_supports, _prepack, NativeLinear("a8w8_rows_avx2", _rows_arguments),
           layout="int8_rows", own_weight=True, in_place_rows=True, epilogues=("swiglu",), max_m=16, rank=(1, 30), activations="int8 per row",
           reads=2 + MAX_SOURCES),
    Kernel("zen_a8w8_rows_avx512", "zen", _rows_supports, _prepack, NativeLinear("a8w8_rows_avx512", _rows_arguments),
           layout="int8_rows", own_weight=True, in_place_rows=True, epilogues=("swiglu",), max_m=16, rank=(0, 29), activations="int8 per row",
           reads=2 + MAX_SOURCES),
)
