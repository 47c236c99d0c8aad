"""The one op the compiled graph calls, ``zen::quant_linear``, and the plan it follows.

The compiled graph holds one call per matched linear::

    y = zen.quant_linear(x2d, [packed tensors of every kernel in the plan], counts, bias, plan)

``plan`` is a string (so it is part of Inductor's FX-graph-cache key) naming the kernel of every
shape bin; the op picks the kernel for the rows of ``x`` at run time, without recompiling. A bin
entry ``lazy:a+b`` times a and b at the bin's first real call; the choice goes to whoever
registered with ``on_lazy_choice`` (the tuner, which keeps it on disk).
"""
from __future__ import annotations

import bisect
import functools
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .registry import KERNELS
from .weights import LinearSpec


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



# The op is defined on the dispatcher directly, CPU kernel only: torch.library.custom_op's Python
# wrapper (autograd and schema handling per call) cost more than a decode GEMV of a small layer.
# Packed tensors per kernel are told apart by a count list carried in the call.
_LIB = torch.library.Library("zen", "DEF")
# residual (patterns/residual_add.py): an fp32 [M, N] the op returns ``residual + y`` with, in fp32
_LIB.define("quant_linear(Tensor x, Tensor[] packed, int[] counts, Tensor? bias, str plan, *, Tensor? residual=None) -> Tensor")
# One of our C++ linear entries called from C++ (csrc/ops.cpp, native_entry.py): the graph
# calls it directly where a linear's rows are known when compiling and its kernel is one of ours
_LIB.define("quant_linear.native(Tensor x, Tensor[] weight, Tensor? bias, str entry, int n, int[] dims, int[] extra, "
            "bool swiglu, *, Tensor? residual=None) -> Tensor")
# Both at once, for a graph whose rows are not known when compiling but may be one (an ahead-of-time
# program serving a prompt and every decode step): one row runs ``entry`` as .native does, more
# follow the plan (csrc/ops.cpp, no Python for the one row)
_LIB.define("quant_linear.by_rows(Tensor x, Tensor[] packed, int[] counts, Tensor? bias, str plan, Tensor[] weight, "
            "Tensor? native_bias, str entry, int n, int[] dims, int[] extra, bool swiglu, *, Tensor? residual=None) "
            "-> Tensor")



# (plan, bin index, candidates, winner, times in us) -> None: set once, by the tuner
_lazy_choice_listeners: list[Callable] = []


def on_lazy_choice(listener: Callable) -> None:
    """Call ``listener(plan, bin_index, names, winner, times_us)`` whenever a lazy bin chooses."""
    if listener not in _lazy_choice_listeners:
        _lazy_choice_listeners.append(listener)


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
        times = {}
        for name, run, part in self.candidates:
            run(x, packed[part], bias, spec)
            t0 = time.perf_counter()
            for _ in range(3):
                run(x, packed[part], bias, spec)
            times[name] = (time.perf_counter() - t0) / 3 * 1e6
        best = min(times, key=times.get)
        for listener in _lazy_choice_listeners:
            listener(self.plan, self.index, [n for n, _, _ in self.candidates], best, times)
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
    if not x.is_contiguous():  # a view with rows apart (a slice of a wider tensor) or transposed
        x = x.contiguous()
    if residual is None:
        return run(x, packed[part], bias, spec)
    if adds_residual and residual.shape == (x.shape[0], spec.out_n):
        return run(x, packed[part], bias, spec, residual=residual)
    return torch.add(residual, run(x, packed[part], bias, spec))


def _quant_linear_fake(x, packed, counts, bias, plan, *, residual=None):
    return (x if residual is None else residual).new_empty((x.shape[0], Plan.decode(plan).spec.out_n))


def _by_rows_fake(x, packed, counts, bias, plan, weight, native_bias, entry, n, dims, extra, swiglu, *, residual=None):
    return _quant_linear_fake(x, packed, counts, bias, plan, residual=residual)


def _native_fake(x, weight, bias, entry, n, dims, extra, swiglu, *, residual=None):
    out_n = n // 2 if swiglu else n
    return x.new_empty((x.shape[0], out_n), dtype=torch.float32 if residual is not None else x.dtype)


_LIB.impl("quant_linear", _quant_linear_cpu, "CPU")
torch.library.register_fake("zen::quant_linear", _quant_linear_fake, lib=_LIB)
torch.library.register_fake("zen::quant_linear.native", _native_fake, lib=_LIB)
torch.library.register_fake("zen::quant_linear.by_rows", _by_rows_fake, lib=_LIB)
quant_linear = torch.ops.zen.quant_linear.default
native_linear = torch.ops.zen.quant_linear.native
linear_by_rows = torch.ops.zen.quant_linear.by_rows
