"""The kernel contract: what a candidate kernel declares, and how one is called.

A kernel is a value: its name, the family it belongs to (``source``), what it accepts
(``supports(spec) -> reason | None``), how it packs a weight once at compile time (``prepack``),
how it runs (``run(x2d, packed, bias, spec) -> y2d``), the layout its packing shares with other
kernels, the epilogues it fuses, the rows it serves, the native library it needs, the kernels that
compute the same faster (``dominated_by``), and its static rank (the order the tuner tries, and
chooses by when it does not time). Each family module holds a table of them; ``registry`` puts the
tables together.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..cpu import native_bf16_gemm
from .epilogues import apply_epilogue
from .native_entry import NativeLinear
from .weights import LinearSpec, QuantWeight

class Unsuited(str):
    """A reason that says the kernel is not meant for this kind of linear (other bits, dense or
    quantized, weight-only or not), as opposed to a constraint this linear misses: near-miss
    reports leave these out."""


# where a native bf16 GEMM makes zentorch's the one to beat (both names are unavailable elsewhere)
BF16_GEMM, BF16_GEMM_COPY = (("zentorch_linear",), ("zentorch_linear_dequantized",)) if native_bf16_gemm() else ((), ())


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
    # our C++ library (native.SOURCES) it needs, built once a spec needs it; a NativeLinear run's own
    native: str = ""
    # our C++ libraries ``run`` uses where they build and does without (ATen's ops) where they do
    # not: started with the kernel's candidacy, carried by ahead-of-time packages, never required
    helpers: tuple = ()
    # ``run`` also takes ``residual=`` (fp32 [M, N], patterns/residual_add.py) and returns
    # ``residual + y`` in fp32, the add done as it stores y (with no epilogue only): every NativeLinear does
    residual: bool = False

    # the static rule's order (lower first) while the GEMM is memory-bound (decode), and once it
    # is compute-bound (prefill): what the tuner tries first, and chooses by when it does not time
    rank: tuple = (50, 50)
    # a hardware unit without which the kernel runs, slowly: "bf16_gemm" (AVX512-BF16 or AMX),
    # "int8_gemm" (VNNI or AMX); the static rule puts such kernels last on CPUs without it
    fast_with: str = ""
    # what the kernel does to x: "as given" (computes in fp32 from x's own values), "int8 per row"
    # (symmetric, torchao's dynamic grid), "int8 per group" (finer than torchao's)
    activations: str = "as given"
    # bytes a weight of a copy the packing is, where another kernel serves on the model's own
    # tensor or a packing the linear needs anyway (the dequantized bf16 copies: 2; zentorch's int8
    # one: 1): such a kernel is a candidate only where memory holds the copy beside the packings
    # still to come
    copy_bytes_per_weight: int = 0
    # how many of its layout's packed tensors ``run`` reads, from the first (0: all of them): a graph
    # carries only those (the int4 tiles' column sums serve zen_a8w4_avx2 alone: 13 MB of SmolLM2)
    reads: int = 0
    # its packing is the reading's own tensor as it is (a view, no bytes of its own): where the
    # reading is the model's tensor, not one the pass made (a merge, a reorder), its layout is free
    own_weight: bool = False
    # and where the pass made the reading of the model's tensors (``QuantWeight.row_sources``: a
    # merge, a reorder), its packing reads those tensors where they lie: its layout is free there too
    in_place_rows: bool = False
    # its packing must stay where prepack made it: zentorch's dynamic int8 GEMM computes garbage on
    # a copy of its prepacked bytes (-41 dB after a clone), so no huge pages and no clones for timing
    pinned: bool = False

    def __post_init__(self):
        if isinstance(self.run, NativeLinear):
            object.__setattr__(self, "native", self.run.library)
            object.__setattr__(self, "residual", True)

    @property
    def packing(self) -> str:
        """What its packed copy of a weight is known by: its layout, shared with the kernels of that
        layout, or its own name where it packs for itself."""
        return self.layout or self.name

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


def run_kernel(kernel: Kernel, x, packed, bias, spec):
    if not x.is_contiguous():  # every kernel here reads x as rows packed one after another
        x = x.contiguous()
    return kernel.runner(spec)(x, packed, bias, spec)

