"""Choose a kernel per shape bin for every match, by measurement, and remember the choice.

For each bin (``shape_bins``) the tuner runs every candidate on a representative M, first
checking its output against the fp32 reference (``verification``), then timing it as a model
calls it (``timing``). Winners go to a file (``tuning_cache``), so a second process tunes nothing;
bins it cannot time take the static rule (``shape_bins.static_order``).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import config, native, timing
from .allocator import collapse_to_huge_pages, on_huge_pages, release_freed_memory
from .kernels import KERNELS, LAZY, LinearSpec, Plan, QuantWeight, candidates, on_lazy_choice
from .record import NoKernel
from .bins import ShapeBin, shape_bins, static_choice, static_order
from .tuning_cache import TuningCache, cache_key
from .verification import Verifier

log = logging.getLogger("zen_inductor")


@dataclass
class BinResult:
    bin: str
    winner: str
    times_us: dict = field(default_factory=dict)
    excluded: dict = field(default_factory=dict)
    from_cache: bool = False
    note: str = ""
    seconds: float = 0.0  # what choosing this bin's kernel cost the compile: verifying, packing, timing


@dataclass
class Tuning:
    plan: Plan
    bins: list  # BinResult per shape bin
    excluded: dict  # kernel -> reason it was never a candidate
    packed: dict  # kernel of the plan -> its packed tensors


class Tuner:
    """Tunes the matches of one compile, timing kernels for at most ``config.autotune_budget_s``.

    Only timing counts against the budget: reading, packing and verifying a weight happen with or
    without tuning, and so does building a native kernel the first time. When those counted too, a
    1B-shape model's first compile (kernels built, 16 linears read) spent the budget on its first
    two linear shapes and left the decode bins of gate/up, down and lm_head to the static rule.
    """

    def __init__(self):
        self.cache = TuningCache()
        self.verified: set = set()  # (spec, kernel, m) checked in full on a weight of this compile
        self.timing_left_s = config.autotune_budget_s
        self.quiet_wait_left_s = timing.QUIET_WAIT_S  # for other processes to let go of the CPUs (timing.wait_for_quiet)

    def plan(self, spec: LinearSpec, weight: QuantWeight, bias: Optional[torch.Tensor], packings_ahead: int = 0,
             rows: Optional[int] = None, packed_before: Optional[dict] = None, model_storages: frozenset = frozenset()) -> Tuning:
        """The linear's plan: a kernel per bin. ``rows``: the one M the graph runs it at, where
        that is fixed (a decode step's 1, the last position's output layer): only its bin is
        chosen, and every bin of the plan names that kernel. ``packed_before``: layout -> the
        packed tensors another graph holds for this weight, read by the kernels of that layout
        instead of a packing of their own, and preferred within ``config.layout_tolerance``.
        ``model_storages``: the storages of the model's tensors behind the weight: where the
        reading is one of them, the layouts of kernels that read it as it is cost nothing."""
        kernels, excluded = candidates(spec, packings_ahead)
        if not kernels:
            raise NoKernel("; ".join(f"{k}: {r}" for k, r in excluded.items()))
        if rows is not None and rows < 1:  # an empty x: every bin, as for a dynamic M
            rows = None
        packed_before = packed_before or {}
        own_reading = _reading_storage(weight) in model_storages
        in_place = _in_place_tensors(weight, model_storages)
        reads_own = [k for k in kernels if k.own_weight and (own_reading or (in_place and k.in_place_rows))]
        if reads_own:
            # before timing: the model's tensors are the first timing copy, and what decode reads
            for t in in_place or [_reading(weight)]:
                collapse_to_huge_pages(t)
        linear = _LinearTuning(self, spec, weight, bias, [k.name for k in kernels], excluded, one_bin=rows is not None)
        linear.packed.share(packed_before)
        bins = shape_bins()
        edges = tuple(b.hi for b in bins[:-1])
        if rows is not None:
            bins = [b for b in bins if b.lo <= rows and (b.hi is None or rows <= b.hi)]
        results = [linear.choose(b) for b in bins]
        held = dict.fromkeys(packed_before, "the layout another graph holds")
        held.update(dict.fromkeys((k.packing for k in reads_own), "the model's own weight"))
        _one_layout(bins, results, held)
        winners = tuple(r.winner for r in results) if rows is None else (results[0].winner,) * (len(edges) + 1)
        plan = Plan(spec, edges, winners)
        return Tuning(plan, results, excluded, _kept(linear.packed, plan))


def _reading(weight) -> torch.Tensor:
    return weight.codes if isinstance(weight, QuantWeight) else weight.weight


def _reading_storage(weight) -> int:
    return _reading(weight).untyped_storage().data_ptr()


def _in_place_tensors(weight, model_storages: frozenset) -> list:
    """The model's tensors a weight the pass made of them (a merge, a reorder) reads where they lie; [] for another weight."""
    sources = getattr(weight, "row_sources", None)
    if sources is None or not all(t.untyped_storage().data_ptr() in model_storages for t in sources.tensors):
        return []
    return list(sources.tensors)


def _one_layout(bins: list, results: list, held: dict | None = None) -> None:
    """Kernels of one layout share one packed copy, so a plan keeps few layouts for a few percent.

    A layout that costs no memory (``held``: layout -> why, another graph's packing or the model's
    own weight) takes each bin where its fastest kernel is within ``config.layout_tolerance`` of
    the winner. Where the other bins' winners keep the weight in more than one layout and one
    layout is within the tolerance in each of them, it takes them all: one packed copy instead of
    two or three. (SmolLM2's q/k/v linear kept zen_w4_avx2's tiles for M = 1, where it timed 44
    against 54 us or the other way round from run to run, beside the VNNI blocks serving every
    other bin: 14 MB twice.) A bin takes only kernels timed in it: no switch on a guess."""
    held = held or {}
    if any(r.winner not in KERNELS for r in results):  # lazy bins choose at run time
        return
    tolerance = config.layout_tolerance
    for b, r in zip(bins, results):
        if KERNELS[r.winner].packing not in held:
            offers = [(found, layout) for layout in held if (found := _fastest_of(layout, b, r)) and found[0] <= tolerance]
            if offers:
                (ratio, name), layout = min(offers)
                _switch(r, name, f"{held[layout]}: {name} at {ratio:.2f}x {r.winner}'s time")
    rest = [(b, r) for b, r in zip(bins, results) if KERNELS[r.winner].packing not in held]
    layouts = {KERNELS[r.winner].packing for _, r in rest}
    if len(layouts) < 2:
        return
    within = {}
    for layout in layouts:
        found = [_fastest_of(layout, b, r) for b, r in rest]
        if all(f and f[0] <= tolerance for f in found):
            within[layout] = sum(f[0] for f in found)
    if within:
        best = min(within, key=within.get)
        for b, r in rest:
            ratio, name = _fastest_of(best, b, r)
            _switch(r, name, f"one layout: {name} at {ratio:.2f}x {r.winner}'s time")


def _fastest_of(layout: str, b: ShapeBin, r: BinResult) -> Optional[tuple]:
    """(time against the winner's, kernel) of the fastest kernel of ``layout`` timed in the bin, or None."""
    found = [(1.0, r.winner)] if KERNELS[r.winner].packing == layout else []
    if r.winner in r.times_us:
        found += [(t / r.times_us[r.winner], name) for name, t in r.times_us.items()
                  if name in KERNELS and KERNELS[name].packing == layout and KERNELS[name].serves(b.lo) is None]
    return min(found, default=None)


def _switch(r: BinResult, name: str, why: str) -> None:
    if name != r.winner:
        r.note = (r.note + "; " if r.note else "") + why
        r.winner = name


class _LinearTuning:
    """One linear's bins, from the smallest M up: what a bin learned bounds the next."""

    def __init__(self, tuner: Tuner, spec: LinearSpec, weight: QuantWeight, bias, usable: list, excluded: dict,
                 one_bin: bool = False):
        self.tuner, self.spec, self.weight, self.bias, self.usable = tuner, spec, weight, bias, usable
        self.packed = _Packings(weight, spec, excluded)
        # A big weight chosen for one bin (a graph at a fixed M) keeps a candidate's full packing
        # only while it is being verified or is the fastest so far. Held side by side, the
        # candidates of a 1B model's int8 output layer (262 M weights: three int8 layouts, two
        # bf16 copies) took the heap 3.9 GB above the model, 1.4 GB now; a 1B int8-dynamic
        # compile peaked at 6.5 GB, 5.4 now. The price: a candidate is packed again to be timed,
        # and there is no second sample (it would need every contender's packing again).
        self.release = one_bin and spec.n * spec.k >= RELEASE_FROM_WEIGHTS
        self.verify = Verifier(spec, weight, bias, self.packed, tuner.verified)
        # kernel -> (its time over the best's, M) where last timed or bounded. A kernel's time does not
        # fall as M grows and the best's grows at most in proportion to M, so a kernel r times
        # behind at M1 is at least r * M1 / M2 behind at M2: past HOPELESS_RATIO it is not timed
        # (dequantize + sgemm kernels' first calls at M=2-64: ~1-1.5 s of a 1B model's cold compile)
        self.behind: dict = {}
        self.timed_below, self.timed_below_m = None, 0  # the last bin timed, and at which M: see compute_bound
        self.part = None  # the first rows of a wide weight, packed when a bin is first timed on them
        self.copies: dict = {}  # (kernel, rows) -> copies of its packed weight, made at the smallest M timed

    def _drop(self, name: str, keep: Optional[str] = None) -> None:
        """Forget ``name``'s full packing and its timing copies (packed again if needed), unless
        ``keep`` (the fastest so far) reads the same layout."""
        if keep is not None and KERNELS[name].packing == KERNELS[keep].packing:
            return
        self.packed.release(name)
        self.copies.pop((name, self.spec.n), None)
        # the compile keeps freed heap for reuse (allocator.reuse_freed_memory), but the next
        # candidate's packing seldom fits the hole this one leaves: released but kept, the heap
        # still grew by every candidate
        release_freed_memory()

    def choose(self, b: ShapeBin) -> BinResult:
        started = time.perf_counter()
        key = cache_key(self.spec, b, self.usable)
        result = self._cached(b, key) or self._measured(b, key)
        result.seconds = round(time.perf_counter() - started, 3)
        return result

    def _cached(self, b: ShapeBin, key: str) -> Optional[BinResult]:
        cached = self.tuner.cache.get(key) if config.autotune else None
        # a cached winner was verified on another weight; it is checked again on this one
        offered = [name for name in self.usable if KERNELS[name].serves(b.lo) is None]
        if not (cached and cached["winner"] in offered and self.verify(cached["winner"], b.representative_m) is None):
            return None
        result = BinResult(b.label, cached["winner"], cached.get("times_us", {}), dict(cached.get("excluded", {})), True)
        self.timed_below, self.timed_below_m = result, b.representative_m
        return result

    def _measured(self, b: ShapeBin, key: str) -> BinResult:
        result = BinResult(b.label, "")
        passing = []
        for i, name in enumerate(self.usable):
            reason = KERNELS[name].serves(b.lo) or self.verify(name, b.representative_m)  # packs on first need
            if reason:
                result.excluded[name] = reason
            else:
                passing.append(name)
            if self.release and all(KERNELS[n].packing != KERNELS[name].packing for n in self.usable[i + 1:]):
                self._drop(name)  # (once the last kernel of its layout is verified)
        if not passing:
            raise NoKernel("every candidate failed verification: " + "; ".join(f"{k}: {r}" for k, r in result.excluded.items()))
        below = self.timed_below
        if config.autotune and config.autotune_lazy and len(passing) > 1:
            result.winner = LAZY + "+".join(passing)
            result.note = "tuned at the first call of this bin"
        elif config.autotune and timing.compute_bound(b, self.spec, self.timed_below_m) and below and below.winner in passing:
            # one call here costs seconds, and a GEMM's ranking no longer changes with M
            result.winner = below.winner
            result.note = f"compute-bound from M={b.lo}: the ranking of bin {below.bin}"
            self.tuner.cache.put({key: {"winner": result.winner, "times_us": {}, "excluded": result.excluded}})
        elif config.autotune and len(passing) > 1 and self.tuner.timing_left_s > 0:
            self._time(b, result, passing, key)
        else:
            result.winner = static_choice(b, passing, self.spec)
            result.note = "static rule" if not config.autotune or len(passing) == 1 else "autotune budget spent; static rule"
        return result

    def _time(self, b: ShapeBin, result: BinResult, passing: list, key: str, retried: bool = False) -> None:
        """Times ``passing`` within the tuner's budget and names the winner, or the static rule's
        choice when the budget runs out in the middle of the bin. Timed while other processes
        took the cores, the bin is timed once more when they let go within the tuner's wait."""
        spec = self.spec
        native.settle()  # no compiler beside the timed kernels
        rows = timing.timing_rows(b, spec)
        if rows < spec.n and self.part is None:
            self.part = _WeightPart(self.weight, spec, self.bias, rows)
        tspec, tpacked, tbias = (self.part.spec, self.part.packed, self.part.bias) if rows < spec.n else (spec, self.packed, self.bias)
        per_rows = spec.n / rows  # times are given for the whole weight
        m = timing.timing_m(b, tspec)
        x = torch.randn(m, spec.k, dtype=spec.act_dtype, generator=torch.Generator().manual_seed(0))  # torch's own RNG untouched
        deadline = time.perf_counter() + self.tuner.timing_left_s
        others = timing.OtherLoad()
        samplers = {}  # kernel -> its timing with copies and repeats, for a second sample
        for name in static_order(b, passing, spec):  # likely winners first: they set the bar
            if time.perf_counter() > deadline:
                break
            ratio, below = self.behind.get(name, (0.0, m))
            # time grows at most linearly in M, so r times the best at M=below is at least
            # r * below / m times it at a larger m (at a smaller one the bound says nothing)
            if m >= below and ratio * below / m > timing.HOPELESS_RATIO:
                result.excluded[name] = f"not timed: {ratio:.1f}x the best at M={below}, so at least {ratio * below / m:.1f}x at M={m}"
                self.behind[name] = (ratio * below / m, m)  # the bound carries on to the next bin
                continue
            if tpacked[name] is None:
                result.excluded[name] = f"first {rows} rows: {tpacked.excluded.get(name, 'prepack failed')}"
                continue
            first_us = timing.first_call_us(KERNELS[name], x, tpacked[name], tbias, tspec) * per_rows
            if result.times_us and first_us > timing.HOPELESS_RATIO * min(result.times_us.values()):
                result.times_us[name] = round(first_us, 1)  # hopeless: no copies, no repeats
                if self.release and tpacked is self.packed:
                    self._drop(name, keep=min(result.times_us, key=result.times_us.get))
                continue
            if (name, rows) not in self.copies:  # made at the smallest M, which needs the most
                repack = functools.partial(KERNELS[name].prepack, tpacked.weight, tspec.act_dtype) if KERNELS[name].pinned else None
                self.copies[name, rows] = timing.weight_copies(tpacked[name], m, repack)

            def sample(name, first_us=first_us):
                # a prefix: the copies of M=1 at M=476 made each sample 8 calls of ~60 ms
                cycle = self.copies[name, rows][:timing.copies_needed(tpacked[name], m)]
                took = timing.time_kernel(KERNELS[name], x, cycle, tbias, tspec, config.autotune_reps, first_us / per_rows)
                return round(took * per_rows, 1)

            result.times_us[name] = sample(name)
            samplers[name] = sample
            if self.release and tpacked is self.packed:
                best = min(result.times_us, key=result.times_us.get)
                for other in [n for n in samplers if n != best]:
                    self._drop(other, keep=best)
                    del samplers[other]
        timing.second_samples(result.times_us, samplers, deadline)
        self.tuner.timing_left_s = deadline - time.perf_counter()
        if rows < spec.n:
            result.note = f"timed on the first {rows} of {spec.n} rows at M={m}, times x{per_rows:.3g}"
        if result.times_us and all(name in result.times_us or name in result.excluded for name in passing):
            share = others.share()
            if share >= timing.CONTENDED_SHARE and not retried and timing.wait_for_quiet(self.tuner):
                again = BinResult(b.label, "")
                self._time(b, again, passing, key, retried=True)
                vars(result).update(vars(again))
                result.note = (result.note + "; " if result.note else "") + f"timed again once others let go ({share:.0%} the first time)"
                return
            result.winner = min(result.times_us, key=result.times_us.get)
            best = result.times_us[result.winner]
            self.behind.update((name, (t / best, m)) for name, t in result.times_us.items())
            self.timed_below, self.timed_below_m = result, m
            if share < timing.CONTENDED_SHARE:
                self.tuner.cache.put({key: {"winner": result.winner, "times_us": result.times_us, "excluded": result.excluded}})
            else:
                why = f"timed while other processes took {share:.0%} of the CPUs: not kept in the tuning cache"
                result.note = (result.note + "; " if result.note else "") + why
                log.warning("zen: %s N=%d K=%d, M bin %s %s", spec.kind, spec.n, spec.k, b.label, why)
        else:  # the budget ran out in the middle of this bin, or nothing could be timed
            result.winner = static_choice(b, passing, spec)
            result.note = "autotune budget spent; static rule" if result.times_us or time.perf_counter() > deadline else "no candidate timed; static rule"
        if m != b.representative_m:
            result.note = result.note or f"timed at M={m}: the bin is compute-bound there already"


# weights from which a one-bin tuning holds one candidate's full packing at a time (_LinearTuning):
# a 1B model's output layer (262 M) and 8B's (525 M) are above it, its gate/up (117 M) too; a
# layer's other linears below, where packing twice would cost compile time for little memory
RELEASE_FROM_WEIGHTS = 64 << 20


# Bins up to this M read each weight once for a handful of rows: bound by memory, where the
# address translations huge pages save show (7% of a bf16 decode). Above it the GEMMs are bound by
# arithmetic, and copying their packings (int4's prefill bf16 copies: ~0.5 GB for a 1B shape) cost
# a cold compile ~1 s of page faults for nothing.
HUGE_PAGE_MAX_M = 4


def _kept(packed: "_Packings", plan: Plan) -> dict:
    """The packed weights a plan keeps; those of kernels serving memory-bound bins on huge pages.
    Kernels of one layout still share theirs. A tensor that is the model's own (a dense kernel
    reads the weight as it is) stays where it is: a copy would hold the weight twice."""
    source = packed.weight
    own = {t.untyped_storage().data_ptr() for t in vars(source).values() if isinstance(t, torch.Tensor)}
    if getattr(source, "row_sources", None) is not None:
        own.update(t.untyped_storage().data_ptr() for t in source.row_sources.tensors)
    memory_bound = {name for m in range(1, HUGE_PAGE_MAX_M + 1) for name in plan.kernels_for(m) if not KERNELS[name].pinned}
    moved = {id(packed[name]) for name in memory_bound}
    placed = {}

    def move(t):
        if not isinstance(t, torch.Tensor) or t.untyped_storage().data_ptr() in own or id(t) in packed.held_tensors:
            return t  # the model's own tensor, or another graph's packing: moved, it would be a second copy
        return on_huge_pages(t)

    def place(value):
        if id(value) not in placed:
            on_pages = id(value) in moved and isinstance(value, (list, tuple))
            placed[id(value)] = [move(t) for t in value] if on_pages else value
        return placed[id(value)]

    return {name: place(packed[name]) for name in plan.kernels}


class _Packings(dict):
    """kernel name -> its packed weight, packed on first use: with every bin's winner cached, only
    the winners are packed (packing every candidate cost ~6 s of a 1B-shape compile). Kernels of
    one ``layout`` share one packed copy. A kernel that cannot pack this weight maps to None and
    is excluded with the reason."""

    def __init__(self, weight, spec, excluded: dict):
        super().__init__()
        self.weight, self.spec, self.excluded = weight, spec, excluded
        self.by_layout: dict = {}
        self.held: set = set()  # layouts another graph holds (share)
        self.held_tensors: set = set()  # their tensors' ids: _kept moves none of them

    def __missing__(self, name):
        kernel = KERNELS[name]
        try:
            if kernel.layout and kernel.layout in self.by_layout:
                value = self.by_layout[kernel.layout]
            else:
                value = kernel.prepack(self.weight, self.spec.act_dtype)
                if kernel.layout:
                    self.by_layout[kernel.layout] = value
        except Exception as e:  # a kernel that cannot pack this weight is not a candidate
            self.excluded[name] = f"prepack failed: {type(e).__name__}: {e}"
            value = None
        self[name] = value
        return value

    def share(self, packed: dict) -> None:
        """Kernels of these layouts read the given tensors (another graph's) instead of packing."""
        for layout, value in packed.items():
            if layout in KERNELS:  # a kernel without a layout of its own: the entry is its packing
                self[layout] = value
            else:
                self.by_layout[layout] = value
        self.held = set(packed)
        self.held_tensors = {id(t) for value in packed.values() for t in value if isinstance(t, torch.Tensor)}

    def release(self, name: str) -> None:
        """Forget ``name``'s packing and that of the kernels sharing its layout; not one another
        graph holds (packing it again would be the second copy)."""
        packing = KERNELS[name].packing
        if packing in self.held:
            return
        for other in [n for n in self if KERNELS[n].packing == packing]:
            if self[other] is not None:  # a failed packing stays: its reason is kept
                del self[other]
        self.by_layout.pop(packing, None)


def _remember_lazy_choice(plan: Plan, index: int, usable: list, winner: str, times: dict) -> None:
    """A lazily tuned bin's winner goes to the same persistent cache as compile-time choices."""
    b = shape_bins(plan.edges)[index]
    TuningCache().put({cache_key(plan.spec, b, usable): {"winner": winner, "times_us": {k: round(v, 1) for k, v in times.items()},
                                                         "excluded": {}, "lazy": True}})
    log.info("zen: M bin %s of %s N=%d K=%d tuned at first call: %s", b.label, plan.spec.kind, plan.spec.n, plan.spec.k, winner)


on_lazy_choice(_remember_lazy_choice)


class _WeightPart:
    """The first ``rows`` output rows of a weight as a linear of their own, packed per kernel on
    first use (a swiglu weight keeps gate and up blocks in turn, so its first rows are one too)."""

    def __init__(self, weight, spec: LinearSpec, bias, rows: int):
        self.spec = dataclasses.replace(spec, n=rows)
        self.bias = bias[:rows] if bias is not None else None
        self.packed = _Packings(weight.rows(rows), self.spec, {})

