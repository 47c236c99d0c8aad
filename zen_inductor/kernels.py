"""Candidate kernels for quantized linears, and the one op the compiled graph calls.

A pattern turns a matched subgraph into a ``QuantWeight`` (what the weight *is*) and a
``LinearSpec`` (what the linear needs). For each spec the registry lists the kernels that can run
it; every kernel says why it cannot (``supports -> reason | None``), packs the weight once at
compile time (``prepack``) and runs it (``run``). Pattern code never names a vendor.

The compiled graph holds one call per match::

    y = zen.quant_linear(x2d, [packed tensors of every kernel in the plan], bias, plan)

``plan`` is a string (so it is part of Inductor's FX-graph-cache key) naming the kernel of every
shape bin; the op picks the kernel for the rows of ``x`` at run time, without recompiling.
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import config, native
from .cpu import native_bf16_gemm, zentorch_unavailable
from .allocator import empty_for_packing

aten = torch.ops.aten


@dataclass(frozen=True)
class QuantWeight:
    """A weight as ``W[n, k] = codes[n, k] * scale[n, k // G] + offset[n, k // G]``.

    ``codes`` are signed (int4 in [-8, 7] or int8 in [-128, 127]) and stored as int8 ``[N, K]``.
    ``zero_point`` is set when the offset is an integer zero point (``offset == -zp * scale``).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    zero_point: Optional[torch.Tensor]
    group_size: int
    bits: int

    @property
    def n(self) -> int:
        return self.codes.shape[0]

    @property
    def k(self) -> int:
        return self.codes.shape[1]

    @property
    def symmetric(self) -> bool:
        return not bool(self.offset.any())

    def rows(self, n: int) -> "QuantWeight":
        """The first ``n`` output rows."""
        zp = self.zero_point[:n] if self.zero_point is not None else None
        return QuantWeight(self.codes[:n], self.scale[:n], self.offset[:n], zp, self.group_size, self.bits)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        w = torch.empty((self.n, self.k), dtype=dtype)  # one full-size tensor, not three
        if dtype == torch.float32:
            self.dequantize_rows(w, 0, self.n)
            return w
        # through an fp32 block: a whole fp32 copy came from fresh pages (0.9 s of a cold int4
        # compile when bf16 copies were made for zentorch_linear_dequantized)
        for block, start, end in fp32_row_blocks(self.n, self.k):
            self.dequantize_rows(block, start, end)
            w[start:end].copy_(block)
        return w

    def dequantize_rows(self, out: torch.Tensor, start: int, end: int) -> None:
        """Rows ``start:end`` in fp32 into ``out`` (a block of ``fp32_row_blocks``)."""
        g = self.group_size
        blocks = out.view(end - start, self.k // g, g)
        blocks.copy_(self.codes[start:end].view(end - start, self.k // g, g))
        blocks.mul_(self.scale[start:end, :, None]).add_(self.offset[start:end, :, None])


@dataclass(frozen=True)
class DenseWeight:
    """An unquantized (bf16) weight ``[N, K]``: the dense_matmul family tunes these too."""

    weight: torch.Tensor
    bits: int = 16
    group_size: int = 0
    symmetric: bool = True

    @property
    def n(self) -> int:
        return self.weight.shape[0]

    @property
    def k(self) -> int:
        return self.weight.shape[1]

    def rows(self, n: int) -> "DenseWeight":
        """The first ``n`` output rows."""
        return DenseWeight(self.weight[:n])

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return self.weight.to(dtype)

    def dequantize_rows(self, out: torch.Tensor, start: int, end: int) -> None:
        out.copy_(self.weight[start:end])


@dataclass(frozen=True)
class LinearSpec:
    """What a kernel must support for one match."""

    n: int
    k: int
    group_size: int
    bits: int
    symmetric: bool
    act_dtype: torch.dtype
    dynamic_activation: bool = False  # int8 per-row activation quantization in the kernel
    epilogue: str = ""  # "" or "swiglu": see apply_epilogue

    @property
    def out_n(self) -> int:
        return self.n // 2 if self.epilogue == "swiglu" else self.n

    @property
    def kind(self) -> str:
        act = "da8" if self.dynamic_activation else "wo"
        gran = "pc" if self.group_size == self.k else f"g{self.group_size}"
        sym = "sym" if self.symmetric else "asym"
        epilogue = f"_{self.epilogue}" if self.epilogue else ""
        return f"{act}_int{self.bits}_{gran}_{sym}_{str(self.act_dtype).replace('torch.', '')}{epilogue}"


SWIGLU_BLOCK = 8  # rows of gate, then of up, in turn in a swiglu weight (the kernels' tile height)


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
    if spec.epilogue != "swiglu" or y.dtype not in (torch.bfloat16, torch.float32) or native.unavailable("swiglu_avx2"):
        return epilogue_reference(y, spec)
    y = y.contiguous()
    out = torch.empty((y.shape[0], spec.out_n), dtype=y.dtype)
    if y.shape[0]:
        bf16 = int(y.dtype == torch.bfloat16)
        native.load("swiglu_avx2")(y, out, y.shape[0], spec.out_n, bf16, bf16)
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


@dataclass(frozen=True)
class Kernel:
    name: str
    source: str  # "aten", "zentorch", "zen" (our C++), "torch" (dequantize + GEMM), "dense"
    supports: Callable[[LinearSpec], Optional[str]]
    prepack: Callable[[QuantWeight, torch.dtype], list]
    run: Callable  # (x2d, packed, bias, spec) -> y2d
    layout: str = ""  # kernels with the same layout share one packed copy of a weight
    epilogues: tuple = ()  # epilogues ``run`` computes itself; apply_epilogue does the others
    # kernels that compute the same arithmetic faster, each a name or a tuple of names that do it
    # together (one for small M, one for large): see candidates()
    dominated_by: tuple = ()
    max_m: Optional[int] = None  # bins whose smallest M is above this do not offer the kernel
    native: str = ""  # our C++ library (native.SOURCES) it runs, built once a spec needs it
    # ``run`` also takes ``residual=`` (fp32 [M, N], patterns/residual_add.py) and returns
    # ``residual + y`` in fp32, the add done as it stores y (with no epilogue only)
    residual: bool = False

    def serves(self, lo: int) -> Optional[str]:
        """Why the kernel is not offered for M from ``lo`` up, or None."""
        if self.max_m is not None and lo > self.max_m:
            return f"a GEMV, offered up to M={self.max_m}"
        return None

    def runner(self, spec: LinearSpec) -> Callable:
        """``run`` for ``spec``, with its epilogue fused or applied after."""
        if not spec.epilogue or spec.epilogue in self.epilogues:
            return self.run
        plain = dataclasses.replace(spec, epilogue="")
        return lambda x, packed, bias, _: apply_epilogue(self.run(x, packed, bias, plain), spec)


# ---------------------------------------------------------------------------------------------
# Candidates.

_INT4PACK_GROUPS = (32, 64, 128, 256)


def _int4pack_supports(spec: LinearSpec) -> Optional[str]:
    if spec.bits != 4:
        return f"not for int{spec.bits} weights"
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
        return "not for dense weights"
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


def _dequant_supports(spec: LinearSpec) -> Optional[str]:
    if spec.bits > 8:
        return "not for dense weights"
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


def _zentorch_woq_supports(spec: LinearSpec) -> Optional[str]:
    if spec.bits != 4:
        return "not for this linear: int4 weights only"
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
        return "not for quantized weights: see zentorch_linear_dequantized"
    return _zentorch_gemm_reason(spec)


def _zentorch_dequantized_supports(spec: LinearSpec) -> Optional[str]:
    if spec.bits > 8:
        return "not for dense weights: see zentorch_linear"
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


def _int_mm_da8_supports(spec: LinearSpec) -> Optional[str]:
    if not spec.dynamic_activation or spec.bits > 8:
        return "not for weight-only linears"
    if spec.group_size != spec.k or not spec.symmetric:
        return "per-channel symmetric weights only"
    if spec.act_dtype not in (torch.bfloat16, torch.float32):
        return f"{spec.act_dtype} activations"
    return None


def _int_mm_da8_prepack(w: QuantWeight, act_dtype):
    return [w.codes.t().contiguous(), w.scale[:, 0].contiguous()]


def _int_mm_da8_run(x, packed, bias, spec):
    # per-row symmetric int8 activations (as torchao's Int8DynamicActivation), int32 accumulate
    codes_kn, w_scale = packed
    xf = x.to(torch.float32)
    x_scale = xf.abs().amax(dim=1, keepdim=True).clamp_min(1e-7) / 127.0
    xq = torch.round(xf / x_scale).clamp_(-127, 127).to(torch.int8)
    y = torch._int_mm(xq, codes_kn).to(torch.float32).mul_(x_scale).mul_(w_scale)
    if bias is not None:
        y += bias
    return y.to(x.dtype)


def _zentorch_dqlinear_supports(spec: LinearSpec) -> Optional[str]:
    if not spec.dynamic_activation or spec.bits != 8 or spec.group_size != spec.k or not spec.symmetric:
        return "not for this linear: per-channel symmetric int8 weights with dynamic activations only"
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
    return "not for dense weights" if spec.bits > 8 else f"not for int{spec.bits} weights"


def _a8w4_supports(spec: LinearSpec) -> Optional[str]:
    if spec.bits == 4 and not spec.dynamic_activation and not config.int8_activations_for_weight_only:
        return "not for weight-only linears: it quantizes activations (config.int8_activations_for_weight_only)"
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


def _run_native(name: str, x, weight: list, bias, spec, dims: tuple, extra: tuple = (), residual=None):
    """``y = x @ W^T (+ bias)``, then the epilogue, by the native kernel ``name``, whose entry
    takes ``(x, *weight, bias, y, M, N, *dims, x_bf16, y_bf16, has_bias, *extra, swiglu, residual,
    has_residual)``; with a residual y is ``residual + y`` in fp32 (no epilogue then)."""
    if not x.is_contiguous():
        x = x.contiguous()
    bias, residual = _fp32_contiguous(bias), _fp32_contiguous(residual)
    y = torch.empty((x.shape[0], spec.out_n), dtype=x.dtype if residual is None else torch.float32)
    if x.shape[0]:
        native.load(name)(
            x, *weight, weight[0] if bias is None else bias, y, x.shape[0], spec.n, *dims,
            int(x.dtype == torch.bfloat16), int(y.dtype == torch.bfloat16), int(bias is not None), *extra,
            int(spec.epilogue == "swiglu"), *((weight[0], 0) if residual is None else (residual, 1)),
        )
    return y


def _fp32_contiguous(t):
    """``t`` as the kernels read it (fp32, rows packed), or None."""
    return t if t is None or (t.dtype == torch.float32 and t.is_contiguous()) else t.to(torch.float32).contiguous()


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


def _a8w4_run(x, packed, bias, spec, residual=None):
    group = _tile_group(packed, spec)
    if group == 32:  # two groups a block: not the layout a8w4_avx2.cpp reads
        raise ValueError("zen_a8w4_avx2 does not take weights in groups of 32")
    return _run_native("a8w4_avx2", x, packed[:4], bias, spec, (spec.k, group), (), residual)


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
    # lines of 16 rows and, for grouped weights, scales and offset - z scale [16] fp32 each;
    # per-channel scales and offsets [ceil(N/16), 16] apart
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
        for t in (scale, offset):  # [N + pad, K/Gw] -> [ceil(N/16), K/G, 64 bytes]
            records.append(_per_tile(t.repeat_interleave(w.group_size // g, dim=1), rows=16).view(torch.uint8))
        params = [torch.empty(0)] * 2  # (the kernel reads the records' own)
    else:
        params = [scale.view(blocks, 16), offset.view(blocks, 16)]
    out = empty_for_packing((blocks, k // g, sum(r.shape[2] for r in records)), torch.uint8)
    return [torch.cat(records, dim=2, out=out), *params]


def _blocks16_run(x, packed, bias, spec, residual=None):
    records, scale = packed[0], packed[1]
    return _run_native("woq_avx512", x, packed[:3], bias, spec, (spec.k, spec.k // records.shape[1]),
                       (spec.bits, int(scale.numel() == 0)), residual)


def _woq_run(x, packed, bias, spec, residual=None):
    return _run_native("woq_avx2", x, packed[:3], bias, spec, (spec.k, _tile_group(packed, spec)), (spec.bits,),
                       residual)


def _tiles_supports(spec: LinearSpec, bits: int) -> Optional[str]:
    return _bits_reason(spec, bits) or _tile_layout_reason(spec)


# Kernels that make an fp32 weight per call make it a block of rows at a time into one buffer of
# this size, each block straight into its GEMM. Made whole, a 16384 x 2048 weight's fp32 copy
# (128 MB) came from fresh pages every call and from DRAM into the GEMM: int4_tiles_sgemm at
# M=64 took 145 ms whole, 47 ms in blocks; the bf16 upcast + sgemm 115 ms, 50 ms.
_FP32_BLOCK_BYTES = 4 << 20


def fp32_row_blocks(n: int, k: int, multiple: int = 1):
    """``(block, start, end)`` over the rows of an [n, k] fp32 matrix made a block at a time:
    one buffer of ~_FP32_BLOCK_BYTES, reused; blocks are a multiple of ``multiple`` rows."""
    rows = min(n, max(multiple, _FP32_BLOCK_BYTES // (4 * k) // multiple * multiple))
    block = torch.empty((rows, k), dtype=torch.float32)
    for start in range(0, n, rows):
        end = min(start + rows, n)
        yield block[: end - start], start, end


def _sgemm_by_row_blocks(x, n: int, k: int, make_rows, bias):
    """``x @ W^T (+ bias)`` in fp32, where ``make_rows(out, start, end)`` writes rows
    ``start:end`` of the [n, k] weight into ``out`` in fp32; blocks are a multiple of 8 rows
    (the tiles' height)."""
    x32 = x.to(torch.float32)
    y = torch.empty((x.shape[0], n), dtype=torch.float32)
    for w, start, end in fp32_row_blocks(n, k, multiple=8):
        make_rows(w, start, end)
        torch.mm(x32, w.t(), out=y[:, start:end])
    if bias is not None:
        y += bias
    return y.to(x.dtype)


def _tiles_sgemm_run(x, packed, bias, spec):
    # fp32 GEMM on a weight dequantized per call by our C++ (about 10x faster than doing it
    # with torch ops), from the same packed copy as the GEMV kernels of its layout
    tiles, scale, offset = packed[:3]
    group, dequantize = _tile_group(packed, spec), native.load("tiles_dequant")

    def make_rows(out, start, end):
        t0, t1 = start // 8, end // 8
        dequantize(tiles[t0:t1], scale[t0:t1], offset[t0:t1], out, end - start, spec.k, group, spec.bits)

    return _sgemm_by_row_blocks(x, spec.n, spec.k, make_rows, bias)


def _dense_supports(spec: LinearSpec) -> Optional[str]:
    if spec.bits != 16:
        return "not for quantized weights"
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


def _bf16_gemv_run(x, packed, bias, spec, residual=None, blocks: bool = False):
    # without native bf16 (AVX2) ATen's bf16 GEMV is far from the memory roofline; this one
    # widens bf16 by a shift and streams 8 weight rows at a time
    return _run_native("bf16_gemv_avx2", x, packed[:1], bias, spec, (spec.k,), (int(blocks),), residual)


def _bf16_vnni_supports(spec: LinearSpec) -> Optional[str]:
    return _dense_supports(spec) or (f"K={spec.k} is odd (the kernel takes pairs along K)" if spec.k % 2 else None)


def _bf16_vnni_prepack(w: DenseWeight, act_dtype):
    # [ceil(N/16), K/2, 16, 2]: the pairs vdpbf16ps takes, 16 rows as one stream
    # (csrc/bf16_gemv_avx512.cpp); moved as int32 pairs, 1.5x faster than as bf16 [..., 2]
    padded = torch.nn.functional.pad(w.weight, (0, 0, 0, -w.n % 16)).view(torch.int32)
    out = empty_for_packing((padded.shape[0] // 16, w.k // 2, 16), torch.int32)
    out.copy_(padded.view(-1, 16, w.k // 2).transpose(1, 2))
    return [out.view(torch.bfloat16).view(-1, w.k // 2, 16, 2)]


def _bf16_vnni_run(x, packed, bias, spec, residual=None):
    return _run_native("bf16_gemv_avx512", x, packed[:1], bias, spec, (spec.k,), residual=residual)


def _dense_mm_run(x, packed, bias, spec):
    return torch.addmm(bias, x, packed[0].t()) if bias is not None else torch.mm(x, packed[0].t())


def _dense_sgemm_run(x, packed, bias, spec):
    # upcast per call: costs a pass over the weight, pays off once the GEMM is compute-bound on a
    # CPU without native bf16 (measured here at M=64: 19.5 ms bf16 vs 4.6 ms upcast + sgemm)
    weight = packed[0]
    return _sgemm_by_row_blocks(x, spec.n, spec.k, lambda out, start, end: out.copy_(weight[start:end]), bias)


# where a native bf16 GEMM makes zentorch's the one to beat (both names are unavailable elsewhere)
_BF16_GEMM, _BF16_GEMM_COPY = (("zentorch_linear",), ("zentorch_linear_dequantized",)) if native_bf16_gemm() else ((), ())

KERNELS: dict[str, Kernel] = {
    k.name: k
    for k in (
        # where our int4 GEMV and the bf16 copy both serve it won no cell of linears-llama1b-4l.md
        # (1.2-1.8x behind zen_w4_avx2 at M=1, 2.3x behind the copy at M=16-128, even at 512),
        # yet at the top of the 65-256 bin it times even with the copy and was chosen there: the
        # int4 llama1b prefill then took 293 ms against 156, the Qwen3 one 80 against 57
        Kernel("zentorch_woq_linear", "zentorch", _zentorch_woq_supports, _zentorch_woq_prepack, _zentorch_woq_run,
               dominated_by=(("zen_w4_avx2", "zentorch_linear_dequantized"), ("zen_w4_avx512", "zentorch_linear_dequantized"))),
        # behind zen_w4_avx2 wherever both serve: at M=1 1.2-1.8x on the five llama1b shapes, at
        # M=4 1.1-1.2x, from M=16 both far behind the bf16 copy (Zen 4); 2-3x at M=1 on AVX2. Its
        # packing and verification cost ~1.7 s of a cold int4 compile
        Kernel("aten_int4pack_mm", "aten", _int4pack_supports, _int4pack_prepack, _int4pack_run,
               dominated_by=("zen_w4_avx2", "zen_w4_avx512")),
        # behind zen_w8_avx512 at every M <= 16 (1.1-3.3x on the five llama1b-4l shapes, Zen 4) and
        # behind the bf16 copy's GEMM from M=64 (2.6-4x): it won no bin of int8wo or int8dq, and
        # its verification took ~1.2 s of a cold int8 compile (py-spy)
        Kernel("aten_int8pack_mm", "aten", _int8pack_supports, _int8pack_prepack, _int8pack_run,
               dominated_by=(("zen_w8_avx512", "zentorch_linear_dequantized"),)),
        Kernel("zentorch_dynamic_qlinear", "zentorch", _zentorch_dqlinear_supports, _zentorch_dqlinear_prepack, _zentorch_dqlinear_run),
        Kernel("aten_int_mm_da8", "aten", _int_mm_da8_supports, _int_mm_da8_prepack, _int_mm_da8_run),
        Kernel("zen_a8w4_avx2", "zen", _a8w4_supports, _a8w4_prepack, _a8w4_run, layout="int4_tiles", epilogues=("swiglu",),
               native="a8w4_avx2", residual=True),
        # where the AVX-512 siblings and the bf16 copy's GEMM serve, these win no bin: at M=1-4
        # the siblings are even or ahead (the 17 llama1b-4l decode linears, int4 g128: M=1 5.45
        # against 5.58 ms, M=4 11.2 against 14.5; int8: M=1 7.8 against 7.7, M=4 13.1 against
        # 15.4), from M=16 the copy is 1.3-2.5x ahead (linears-llama1b-4l.md)
        Kernel("zen_w4_avx2", "zen", _w4_supports, _a8w4_prepack, _woq_run, layout="int4_tiles", epilogues=("swiglu",),
               native="woq_avx2", dominated_by=(("zen_w4_avx512", "zentorch_linear_dequantized"),), residual=True),
        Kernel("zen_w8_avx2", "zen", _w8_supports, _int8_tiles_prepack, _woq_run, layout="int8_tiles", epilogues=("swiglu",),
               native="woq_avx2", dominated_by=(("zen_w8_avx512", "zentorch_linear_dequantized"),), residual=True),
        # AVX512-VNNI, 16-row blocks in 4 streams a thread, as zen_bf16_gemv_avx512
        Kernel("zen_w4_avx512", "zen", _w4_supports, _blocks16_prepack, _blocks16_run, layout="int4_blocks16",
               epilogues=("swiglu",), max_m=4, native="woq_avx512", residual=True),
        Kernel("zen_w8_avx512", "zen", _w8_supports, _blocks16_prepack, _blocks16_run, layout="int8_blocks16",
               epilogues=("swiglu",), max_m=4, native="woq_avx512", residual=True),
        # with a native bf16 GEMM the bf16 copy's GEMM is ahead of these fp32 GEMMs on weights
        # dequantized per call: 2-10x in all 30 (shape, M) cells of the int4 and int8 llama1b
        # linears on Zen 4, none within the tuner's "hopeless" 2x
        Kernel("int4_tiles_sgemm", "torch", functools.partial(_tiles_supports, bits=4), _a8w4_prepack, _tiles_sgemm_run,
               layout="int4_tiles", native="tiles_dequant", dominated_by=_BF16_GEMM_COPY),
        Kernel("int8_tiles_sgemm", "torch", functools.partial(_tiles_supports, bits=8), _int8_tiles_prepack, _tiles_sgemm_run,
               layout="int8_tiles", native="tiles_dequant", dominated_by=_BF16_GEMM_COPY),
        # a bf16 copy of the quantized weight for a bf16 GEMM: dequantized once, at compile time
        Kernel("zentorch_linear_dequantized", "torch", _zentorch_dequantized_supports, _zentorch_linear_prepack,
               _zentorch_linear_run, layout="zentorch_dense"),
        # dequantizing at every call instead: measured on Zen 4, 1.7-2x behind the copy's GEMM and
        # zentorch's int4 GEMM in every bin of the llama1b shapes (the dequantization alone took
        # 0.1 s of an lm_head), and verifying it cost ~3 s of a cold compile
        Kernel("dequant_gemm", "torch", _dequant_bf16_supports, _dequant_prepack, _dequant_gemm_run,
               dominated_by=("zentorch_linear_dequantized",)),
        # int4/int8_tiles_sgemm: the same fp32 GEMM, the weight dequantized by C++ ~10x faster
        Kernel("dequant_sgemm", "torch", _dequant_supports, _dequant_prepack, _dequant_sgemm_run,
               dominated_by=("int4_tiles_sgemm", "int8_tiles_sgemm") + _BF16_GEMM_COPY),
        # a bf16 GEMM without AVX512-BF16/AMX: it won none of the 35 bins of the llama1b-4l shapes
        # here, 1.1-2x behind zen_bf16_gemv_avx2 at M=1-16 and 2.5-7x behind dense_sgemm from M=64;
        # verifying and timing it cost ~2 s of a cold compile
        Kernel("dense_mm", "dense", _dense_supports, _dense_prepack, _dense_mm_run, layout="dense",
               dominated_by=("zentorch_linear",) + (() if native_bf16_gemm() else (("zen_bf16_gemv_avx2", "dense_sgemm"),))),
        # measured on Zen 4 (AVX512-BF16), five llama1b shapes summed: M=1 7.5 ms against 12.5 for
        # torch.mm and 8.5 for oneDNN's packed linear; M=128 74 against 80 and 75
        Kernel("zentorch_linear", "dense", _zentorch_linear_supports, _zentorch_linear_prepack, _zentorch_linear_run,
               layout="zentorch_dense"),
        # the upcast + fp32 GEMM is for CPUs without a native bf16 GEMM: on Zen 4 zentorch_linear
        # was 2.5-5x ahead of it at every M of the five llama1b shapes
        Kernel("dense_sgemm", "dense", _dense_supports, _dense_prepack, _dense_sgemm_run, layout="dense",
               dominated_by=_BF16_GEMM),
        # one row of x at a time against each block of W: past M=64 a GEMM is ahead (dense_sgemm
        # 1.2-2.1x faster at M=256 and 476 on all five llama1b shapes, measured here), and timing
        # the GEMVs there cost ~3 s of a cold compile. Where zentorch's AVX512-BF16 GEMM serves it
        # is behind from M=2 and at best even at M=1 (the 17 llama1b decode linears: 27.7 against
        # 27.0 ms, 8 rounds), and a bf16 llama1b decode ran faster without both GEMVs (interleaved,
        # 4 rounds: TPOT median 24.4 against 25.1 ms; 17.6 against 20.6 when the machine's memory
        # was fast): there the tuner leaves them out, and their build
        Kernel("zen_bf16_gemv_avx2", "dense", _bf16_gemv_supports, _dense_prepack, _bf16_gemv_run, layout="dense",
               epilogues=("swiglu",), max_m=64, native="bf16_gemv_avx2", dominated_by=_BF16_GEMM, residual=True),
        # AVX512-BF16: vdpbf16ps on a copy packed as its pairs. The 17 llama1b-4l decode linears
        # alternated with zentorch's GEMM, 10 rounds: M=1 19.4 against 23.6 ms, M=4 19.5 against 21.6
        # (both 12-16 ms when the machine's memory was fast). A GEMV: at M=16 four passes over each
        # block in L2 make it compute-bound, where zentorch's GEMM is not
        Kernel("zen_bf16_gemv_avx512", "dense", _bf16_vnni_supports, _bf16_vnni_prepack, _bf16_vnni_run,
               layout="bf16_vnni", epilogues=("swiglu",), max_m=4, native="bf16_gemv_avx512", residual=True),
        # the same GEMV on a blocked copy: ahead where rows of W are short (K ~ 1024), behind on long ones
        Kernel("zen_bf16_blocks_avx2", "dense", _bf16_gemv_supports, _bf16_blocks_prepack,
               functools.partial(_bf16_gemv_run, blocks=True), layout="bf16_blocks",
               epilogues=("swiglu",), max_m=64, native="bf16_gemv_avx2", dominated_by=_BF16_GEMM, residual=True),
    )
}


def candidates(spec: LinearSpec) -> tuple[list[Kernel], dict[str, str]]:
    """Kernels that may run ``spec``, and the reason each other kernel may not."""
    reasons = {}
    for kernel in KERNELS.values():
        if config.kernel_allow and kernel.name not in config.kernel_allow:
            reasons[kernel] = "not in config.kernel_allow"
        elif kernel.name in config.kernel_deny:
            reasons[kernel] = "in config.kernel_deny"
        else:  # a library this CPU cannot run is never built: its kernels are out before any start
            reasons[kernel] = kernel.supports(spec) or (native.missing_isa(kernel.native) if kernel.native else None)
    if config.prune_dominated_kernels:  # first by kernels that need no build: none is built for a kernel left out
        reasons.update(_dominated([k for k, r in reasons.items() if not r], lambda k: not k.native))
    for kernel, reason in reasons.items():
        if not reason and kernel.native:
            native.start(kernel.native)  # the builds this spec needs run side by side
    if spec.epilogue == "swiglu" and any(not r and spec.epilogue not in k.epilogues for k, r in reasons.items()):
        native.start("swiglu_avx2")  # apply_epilogue's, for the kernels that do not fuse it
    ok, excluded = [], {}
    for kernel, reason in reasons.items():
        reason = reason or (native.unavailable(kernel.native) if kernel.native else None)
        if reason:
            excluded[kernel.name] = reason
        else:
            ok.append(kernel)
    if config.prune_dominated_kernels:  # then by what was built
        for kernel, reason in _dominated(ok, lambda k: True).items():
            ok.remove(kernel)
            excluded[kernel.name] = reason
    return ok, excluded


def _dominated(kernels: list, may_dominate) -> dict:
    """kernel -> why it is left out, for the ``kernels`` that others among them dominate."""
    names = {k.name for k in kernels if may_dominate(k)}
    out = {}
    for kernel in kernels:
        groups = [(entry,) if isinstance(entry, str) else entry for entry in kernel.dominated_by]
        better = next((group for group in groups if all(name in names for name in group)), None)
        if better:
            verb = "computes" if len(better) == 1 else "compute"
            out[kernel] = f"{' and '.join(better)} {verb} the same, faster (config.prune_dominated_kernels)"
    return out


# ---------------------------------------------------------------------------------------------
# The plan a compiled graph carries, and the op that follows it.


def _entry_kernels(entry: str) -> tuple:
    """The kernels of one bin entry: a kernel name, or ``lazy:a+b`` (see ``LAZY`` below)."""
    return tuple(entry[len(LAZY):].split("+")) if entry.startswith(LAZY) else (entry,)


@dataclass(frozen=True)
class Plan:
    spec: LinearSpec
    edges: tuple  # upper edges of the M bins; one more open bin above the last
    bin_kernels: tuple  # kernel name per bin (len(edges) + 1)

    @property
    def kernels(self) -> tuple:
        """Every kernel whose packed weight the graph carries (all candidates of a lazy bin)."""
        return tuple(dict.fromkeys(name for entry in self.bin_kernels for name in _entry_kernels(entry)))

    def kernel_for(self, m: int) -> str:
        return self.bin_kernels[bisect.bisect_left(self.edges, m)]

    def kernels_for(self, m: int) -> tuple:
        """The kernels whose packed weights serve M = m (every candidate of a lazy bin)."""
        return _entry_kernels(self.kernel_for(m))

    def encode(self) -> str:
        s = self.spec
        return ";".join(
            [
                f"n={s.n}", f"k={s.k}", f"g={s.group_size}", f"bits={s.bits}", f"sym={int(s.symmetric)}",
                f"act={str(s.act_dtype).replace('torch.', '')}", f"da8={int(s.dynamic_activation)}",
                f"epi={s.epilogue}", "edges=" + ",".join(map(str, self.edges)),
                "bins=" + ",".join(self.bin_kernels),
            ]
        )

    @staticmethod
    @functools.lru_cache(None)
    def decode(text: str) -> "Plan":
        f = dict(item.split("=", 1) for item in text.split(";"))
        spec = LinearSpec(
            n=int(f["n"]), k=int(f["k"]), group_size=int(f["g"]), bits=int(f["bits"]),
            symmetric=bool(int(f["sym"])), act_dtype=getattr(torch, f["act"]),
            dynamic_activation=bool(int(f["da8"])), epilogue=f.get("epi", ""),
        )
        edges = tuple(int(e) for e in f["edges"].split(",") if e)
        return Plan(spec, edges, tuple(f["bins"].split(",")))


@functools.lru_cache(None)
def _packed_slices(text: str, counts: tuple) -> dict:
    plan = Plan.decode(text)
    slices, start = {}, 0
    for name, count in zip(plan.kernels, counts):
        slices[name] = slice(start, start + count)
        start += count
    return slices


def run_kernel(kernel: Kernel, x, packed, bias, spec):
    if x.stride(-1) != 1:  # every kernel here reads rows of x contiguously
        x = x.contiguous()
    return kernel.runner(spec)(x, packed, bias, spec)


# The op is defined on the dispatcher directly, CPU kernel only: torch.library.custom_op's Python
# wrapper (autograd and schema handling per call) cost more than a decode GEMV of a small layer.
# Packed tensors per kernel are told apart by a count list carried in the call.
_LIB = torch.library.Library("zen", "DEF")
# residual (patterns/residual_add.py): an fp32 [M, N] the op returns ``residual + y`` with, in fp32
_LIB.define("quant_linear(Tensor x, Tensor[] packed, int[] counts, Tensor? bias, str plan, *, Tensor? residual=None) -> Tensor")


LAZY = "lazy:"  # bin entry "lazy:a+b": time a and b on the first real call of the bin


class _LazyBin:
    """A bin tuned at its first call, on the real input; the choice is kept and cached on disk.

    The candidates were verified against the reference at compile time, like eager choices.
    """

    def __init__(self, names, slices, plan: "Plan", index: int):
        self.candidates = [(name, KERNELS[name].runner(plan.spec), slices[name]) for name in names]
        self.plan, self.index = plan, index
        self.choice = None

    def __call__(self, x, packed, bias, spec):
        if self.choice is None:
            self.choice = self._tune(x, packed, bias, spec)
        run, part = self.choice
        return run(x, packed[part], bias, spec)

    def _tune(self, x, packed, bias, spec):
        import time

        from .autotune import remember_lazy_choice

        times = {}
        for name, run, part in self.candidates:
            run(x, packed[part], bias, spec)
            t0 = time.perf_counter()
            for _ in range(3):
                run(x, packed[part], bias, spec)
            times[name] = (time.perf_counter() - t0) / 3 * 1e6
        best = min(times, key=times.get)
        remember_lazy_choice(self.plan, self.index, [n for n, _, _ in self.candidates], best, times)
        return next((run, part) for name, run, part in self.candidates if name == best)


@functools.lru_cache(None)
def _dispatch_table(plan: str, counts: tuple):
    """(bin edges, spec, per bin (kernel run, slice of packed, whether run adds the residual)),
    resolved once per plan."""
    p = Plan.decode(plan)
    slices = _packed_slices(plan, counts)
    per_bin = []
    for i, name in enumerate(p.bin_kernels):
        if name.startswith(LAZY):
            lazy = _LazyBin(name[len(LAZY):].split("+"), slices, p, i)
            per_bin.append((lazy, slice(None), False))
        else:
            kernel = KERNELS[name]
            per_bin.append((kernel.runner(p.spec), slices[name], kernel.residual and not p.spec.epilogue))
    return p.edges, p.spec, tuple(per_bin)


def _quant_linear_cpu(x, packed, counts, bias, plan, *, residual=None):
    edges, spec, per_bin = _dispatch_table(plan, tuple(counts))
    run, part, adds_residual = per_bin[bisect.bisect_left(edges, x.shape[0])]
    if x.stride(-1) != 1:
        x = x.contiguous()
    if residual is None:
        return run(x, packed[part], bias, spec)
    if adds_residual and residual.shape == (x.shape[0], spec.out_n):
        return run(x, packed[part], bias, spec, residual=residual)
    return torch.add(residual, run(x, packed[part], bias, spec))


def _quant_linear_fake(x, packed, counts, bias, plan, *, residual=None):
    return (x if residual is None else residual).new_empty((x.shape[0], Plan.decode(plan).spec.out_n))


_LIB.impl("quant_linear", _quant_linear_cpu, "CPU")
torch.library.register_fake("zen::quant_linear", _quant_linear_fake, lib=_LIB)
quant_linear = torch.ops.zen.quant_linear.default
