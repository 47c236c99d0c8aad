"""What a weight is and what a linear needs: the values every kernel family is written against.

A pattern turns a matched subgraph into a ``QuantWeight`` (or a ``DenseWeight``) and a
``LinearSpec``; kernels accept or refuse the spec, pack the weight and run the linear.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass(frozen=True)
class RowSources:
    """Where the rows of a weight the pass made (a merge, a reorder) lie in the tensors they came
    from: ``codes == cat(tensors)[order]`` (``order`` None: the rows in turn). Kernels that read
    int8 rows where they lie use it instead of the copy (concat_linear's merged gate/up of a 1B
    model: 537 MB beside the model's own rows)."""

    tensors: tuple
    order: Optional[torch.Tensor] = None

    @property
    def n(self) -> int:
        return sum(t.shape[0] for t in self.tensors)

    def row_order(self) -> torch.Tensor:
        return self.order if self.order is not None else torch.arange(self.n)


@dataclass(frozen=True)
class QuantWeight:
    """A weight as ``W[n, k] = codes[n, k] * scale[n, k // G] + offset[n, k // G]``.

    ``codes`` are signed (int4 in [-8, 7] or int8 in [-128, 127]) and stored as int8 ``[N, K]``.
    ``zero_point`` is set when the offset is an integer zero point (``offset == -zp * scale``).
    ``row_sources``: for int8 codes made of other weights' (``concat``, ``reordered``), where
    their rows lie.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    zero_point: Optional[torch.Tensor]
    group_size: int
    bits: int
    row_sources: Optional[RowSources] = field(default=None, repr=False)

    @staticmethod
    def concat(weights: list) -> "QuantWeight":
        """The weights' rows one after another (linears on one input made one)."""
        zps = [w.zero_point for w in weights]
        bits = max(w.bits for w in weights)
        sources = None
        if bits == 8:
            parts = [w.in_place_rows() for w in weights]
            offsets = itertools.accumulate((p.n for p in parts[:-1]), initial=0)
            ordered = all(p.order is None for p in parts)
            order = None if ordered else torch.cat([p.row_order() + o for p, o in zip(parts, offsets)])
            sources = RowSources(tuple(t for p in parts for t in p.tensors), order)
        return QuantWeight(
            codes=torch.cat([w.codes for w in weights]), scale=torch.cat([w.scale for w in weights]),
            offset=torch.cat([w.offset for w in weights]),
            zero_point=torch.cat(zps) if all(z is not None for z in zps) else None,
            group_size=weights[0].group_size, bits=bits, row_sources=sources,
        )

    def reordered(self, rows: torch.Tensor) -> "QuantWeight":
        """Rows ``rows`` of this weight, in that order."""
        sources = None
        if self.bits == 8:
            place = self.in_place_rows()
            sources = RowSources(place.tensors, place.row_order()[rows])
        return QuantWeight(
            codes=self.codes[rows], scale=self.scale[rows], offset=self.offset[rows],
            zero_point=None if self.zero_point is None else self.zero_point[rows],
            group_size=self.group_size, bits=self.bits, row_sources=sources,
        )

    def in_place_rows(self) -> RowSources:
        """Where the rows of ``codes`` lie: in other tensors for a weight made of others, else in ``codes``."""
        return self.row_sources or RowSources((self.codes,))

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


# Kernels that make an fp32 weight per call make it a block of rows at a time into one buffer of
# this size, each block straight into its GEMM. Made whole, a 16384 x 2048 weight's fp32 copy
# (128 MB) came from fresh pages every call and from DRAM into the GEMM: int4_tiles_sgemm at
# M=64 took 145 ms whole, 47 ms in blocks; the bf16 upcast + sgemm 115 ms, 50 ms.
FP32_BLOCK_BYTES = 4 << 20


def fp32_row_blocks(n: int, k: int, multiple: int = 1):
    """``(block, start, end)`` over the rows of an [n, k] fp32 matrix made a block at a time:
    one buffer of ~FP32_BLOCK_BYTES, reused; blocks are a multiple of ``multiple`` rows."""
    rows = min(n, max(multiple, FP32_BLOCK_BYTES // (4 * k) // multiple * multiple))
    block = torch.empty((rows, k), dtype=torch.float32)
    for start in range(0, n, rows):
        end = min(start + rows, n)
        yield block[: end - start], start, end


def sgemm_by_row_blocks(x, n: int, k: int, make_rows, bias):
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

