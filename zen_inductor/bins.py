"""M split into ranges (shape bins), each with its own kernel, and the rule that ranks kernels in a
bin without measuring them.

M (rows = tokens) changes with every call of an LLM: the prompt at prefill, one row at decode.
One compiled graph serves every M; a ``ShapeBin`` is a range of M served by one kernel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from . import config, cpu
from .kernels import KERNELS, LinearSpec


@dataclass(frozen=True)
class ShapeBin:
    lo: int
    hi: Optional[int]  # None: open above

    @property
    def label(self) -> str:
        if self.hi is None:
            return f"{self.lo}+"
        return str(self.lo) if self.lo == self.hi else f"{self.lo}-{self.hi}"

    @property
    def representative_m(self) -> int:
        # the largest M of the bin is where a wrong choice costs most; open bin: twice its start
        return self.hi if self.hi is not None else min(2 * self.lo, 2048)


def shape_bins(edges=None) -> list[ShapeBin]:
    edges = tuple(sorted(set(int(e) for e in (edges if edges is not None else config.shape_bin_edges))))
    bins, lo = [], 1
    for e in edges:
        bins.append(ShapeBin(lo, e))
        lo = e + 1
    bins.append(ShapeBin(lo, None))
    return bins


# The static rule (config.autotune=False, and bins the budget did not reach): each kernel's rank
# (``Kernel.rank``), the memory-bound one while M is small (decode), the compute-bound one from
# these M up. Where that happens was measured here (AVX2, 1B shapes): a bf16 weight's fp32 sgemm
# wins from M ~ 64, but our int4/int8 kernels stay ahead of dequantize + sgemm up to M ~ 256-512.

STATIC_DENSE_FROM_M = 64
STATIC_DEQUANT_FROM_M = 257


def static_choice(bin: ShapeBin, usable: list[str], spec: LinearSpec) -> str:
    return static_order(bin, usable, spec)[0]


def static_order(bin: ShapeBin, usable: list[str], spec: LinearSpec) -> list[str]:
    """``usable`` from the most to the least likely winner on this CPU."""
    compute_bound = bin.lo >= (STATIC_DENSE_FROM_M if spec.bits > 8 else STATIC_DEQUANT_FROM_M)
    flags = cpu.flags()
    # without these units such kernels run through slower paths: int8 GEMMs far below a
    # weight-only kernel (which is also exact in x), a bf16 GEMM 5-7x behind an fp32 one
    slow = {"bf16_gemm": not cpu.native_bf16_gemm(), "int8_gemm": not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}}

    def key(name: str):
        kernel = KERNELS[name]
        return (slow.get(kernel.fast_with, False), kernel.rank[1 if compute_bound else 0], name)

    return sorted(usable, key=key)

