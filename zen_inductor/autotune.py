"""Choose a kernel per shape bin for every match, by measurement, and remember the choice.

M (rows = tokens) changes with every call of an LLM: the prompt at prefill, one row at decode.
One compiled graph serves every M; ``ShapeBin``s split M into ranges, each with its own kernel.

For each bin the tuner runs every candidate on a representative M, first checking its output
against the fp32 reference (a fast wrong kernel must never win), then timing it with the weights
evicted from cache between runs (decode reads weights from DRAM in a real model). Winners are
stored in a JSON file keyed by machine, versions, our kernel sources and shape, so a second process
tunes nothing.
"""
from __future__ import annotations

import dataclasses
import fcntl
import functools
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import config, cpu, native
from .allocator import on_huge_pages
from .record import NoKernel
from .kernels import (KERNELS, LAZY, Kernel, LinearSpec, Plan, QuantWeight, candidates, epilogue_reference, on_lazy_choice,
                      fp32_row_blocks, run_kernel)

log = logging.getLogger("zen_inductor")

# 6: rankings timed while a C++ build ran beside them (before native.settle) are not kept
# 7: nor those from a single sample a contender (_second_samples)
CACHE_VERSION = 7
SQNR_WEIGHT_ONLY_DB = 40.0
SQNR_DYNAMIC_DB = 30.0


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


def sqnr_db(y: torch.Tensor, ref: torch.Tensor) -> float:
    noise = float(torch.linalg.vector_norm(y.detach().float() - ref.detach().float()))
    if not math.isfinite(noise):
        return float("-inf")
    if noise == 0:
        return float("inf")
    return 20 * math.log10(float(torch.linalg.vector_norm(ref.detach(), dtype=torch.float32)) / noise)


@dataclass
class BinResult:
    bin: str
    winner: str
    times_us: dict = field(default_factory=dict)
    excluded: dict = field(default_factory=dict)
    from_cache: bool = False
    note: str = ""
    seconds: float = 0.0  # what choosing this bin's kernel cost the compile: verifying, packing, timing


# ---------------------------------------------------------------------------------------------
# Static rule (config.autotune=False, and bins the budget did not reach): each kernel's rank
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


# ---------------------------------------------------------------------------------------------
# Persistent cache.


def _machine_key() -> str:
    flags = sorted(f for f in cpu.flags() if f.startswith(("avx", "amx", "fma", "f16c")))
    zentorch_version = cpu.zentorch_version()
    try:
        import torchao

        torchao_version = torchao.__version__
    except Exception:
        torchao_version = "none"
    __version__ = importlib.metadata.version("zen_inductor")

    parts = [
        platform.processor() or platform.machine(), _cpu_model(), ",".join(flags),
        f"threads={torch.get_num_threads()}", f"torch={torch.__version__}",
        f"zentorch={zentorch_version}", f"torchao={torchao_version}", f"zen={__version__}",
        f"use_zentorch={config.use_zentorch}", f"native={native.source_digest()}",
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


class TuningCache:
    """``{version, entries: {key: {winner, times_us}}}`` in ``cache_dir/autotune.json``.

    Writers take an exclusive lock on a side file, re-read, merge and replace the file
    atomically, so concurrent processes neither corrupt it nor lose each other's entries.
    """

    def __init__(self, directory: Optional[str] = None):
        self.directory = directory or config.cache_dir
        self.path = os.path.join(self.directory, "autotune.json")

    def _read(self) -> dict:
        try:
            with open(self.path) as f:
                data = json.load(f)
            if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
                raise ValueError("unknown format")
            return data["entries"]
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("zen: autotune cache %s is unreadable (%s); rebuilding it", self.path, e)
            return {}

    def get(self, key: str) -> Optional[dict]:
        entry = self._read().get(key)
        if isinstance(entry, dict) and entry.get("winner") in KERNELS:
            return entry
        return None

    def put(self, updates: dict) -> None:
        try:
            os.makedirs(self.directory, exist_ok=True)
            with open(self.path + ".lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                entries = self._read()
                entries.update(updates)
                fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".autotune-", suffix=".json")
                with os.fdopen(fd, "w") as f:
                    json.dump({"version": CACHE_VERSION, "entries": entries}, f, indent=1, sort_keys=True)
                os.replace(tmp, self.path)
        except OSError as e:
            log.warning("zen: could not write autotune cache %s (%s)", self.path, e)


def cache_key(spec: LinearSpec, bin: ShapeBin, usable: list[str]) -> str:
    return "|".join([_machine_key(), spec.kind, f"n={spec.n}", f"k={spec.k}", f"bin={bin.label}", ",".join(sorted(usable))])


# ---------------------------------------------------------------------------------------------
# Measurement.

_COLD_BYTES = 64 << 20  # weights cycled through per timing sample: more than this machine's caches
_MAX_COPIES = 8


def copies_needed(packed: list, m: int) -> int:
    """How many copies of a packed weight cycling through keeps it out of cache at ``m`` rows."""
    if m >= STATIC_DENSE_FROM_M:  # compute-bound: where the weight sits hardly matters
        return 1
    nbytes = sum(t.numel() * t.element_size() for t in packed)
    return max(1, min(_MAX_COPIES, _COLD_BYTES // max(nbytes, 1)))


def weight_copies(packed: list, m: int) -> list:
    """Enough copies of a packed weight that cycling through them keeps it out of cache.

    Calls run back to back, as in a model: flushing the cache between calls instead lets the
    OpenMP threads fall asleep, and their wake-up (about 100 us here) swamps a decode GEMM.
    Copies are clones, not new packings: packing again cost 6 s of a 1B-shape compile.
    """
    return [packed] + [[t.clone() for t in packed] for _ in range(copies_needed(packed, m) - 1)]


def _first_call_us(kernel: Kernel, x, packed, bias, spec) -> float:
    t0 = time.perf_counter()
    run_kernel(kernel, x, packed, bias, spec)
    return (time.perf_counter() - t0) * 1e6


# a first call over this many times the best so far: no repeat will make it win (runs of one
# kernel vary by 10-20% here; a ratio of 4 cost a 1B model's first compile ~4 s a linear shape)
HOPELESS_RATIO = 2


# a call this slow is compute-bound and steady: one more, already warm, tells its time (timing
# the 257-1024 bin of a 1B model's linears five times over spent the budget of a first compile;
# measured here, past ~15 ms the second call of int4 GEMMs at M=256-476 is within the 10-15%
# that further calls vary)
SLOW_CALL_US = 20_000


def time_kernel(kernel: Kernel, x, copies: list, bias, spec, reps: int, first_us: float = 0.0) -> float:
    """Median over ``reps`` samples of the time per call, in microseconds. ``first_us``: the time
    of a call just made, which warmed the kernel up."""
    if first_us > SLOW_CALL_US:
        return _first_call_us(kernel, x, copies[0], bias, spec)
    t0 = time.perf_counter()
    run_kernel(kernel, x, copies[0], bias, spec)  # warm-up: lazy init, allocator (clones are touched)
    calls = len(copies)
    if time.perf_counter() - t0 > 0.02:  # a slow candidate tells its story in few runs
        reps = min(reps, 3)
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for i in range(calls):
            run_kernel(kernel, x, copies[i % len(copies)], bias, spec)
        samples.append((time.perf_counter() - t0) / calls)
    return statistics.median(samples) * 1e6


class Tuner:
    """Tunes the matches of one compile, timing kernels for at most ``config.autotune_budget_s``.

    Only timing counts against the budget: reading, packing and verifying a weight happen with or
    without tuning, and so does building a native kernel the first time. When those counted too, a
    1B-shape model's first compile (kernels built, 16 linears read) spent the budget on its first
    two linear shapes and left the decode bins of gate/up, down and lm_head to the static rule.
    """

    def __init__(self):
        self.cache = TuningCache()
        self.timing_left_s = config.autotune_budget_s

    def plan(self, spec: LinearSpec, weight: QuantWeight, bias: Optional[torch.Tensor]) -> "Tuning":
        kernels, excluded = candidates(spec)
        if not kernels:
            raise NoKernel("; ".join(f"{k}: {r}" for k, r in excluded.items()))
        packed = _Packings(weight, spec, excluded)
        usable = [k.name for k in kernels]
        verify = _Verifier(spec, weight, bias, packed)
        bins = shape_bins()
        results, copies = [], {}
        # kernel -> (its time over the best's, M) where last timed or bounded. A kernel's time does not
        # fall as M grows and the best's grows at most in proportion to M, so a kernel r times
        # behind at M1 is at least r * M1 / M2 behind at M2: past HOPELESS_RATIO it is not timed
        # (dequantize + sgemm kernels' first calls at M=2-64: ~1-1.5 s of a 1B model's cold compile)
        behind: dict = {}
        timed_below, timed_below_m = None, 0  # the last bin timed, and at which M: see compute_bound
        part = None  # the first rows of a wide weight, packed when a bin is first timed on them
        for b in bins:
            started = time.perf_counter()
            key = cache_key(spec, b, usable)
            cached = self.cache.get(key) if config.autotune else None
            # a cached winner was verified on another weight; it is checked again on this one
            offered = [name for name in usable if KERNELS[name].serves(b.lo) is None]
            if cached and cached["winner"] in offered and verify(cached["winner"], b.representative_m) is None:
                results.append(BinResult(b.label, cached["winner"], cached.get("times_us", {}), dict(cached.get("excluded", {})), True,
                                         seconds=round(time.perf_counter() - started, 3)))
                timed_below, timed_below_m = results[-1], b.representative_m
                continue
            result = BinResult(b.label, "")
            passing = []
            for name in usable:
                reason = KERNELS[name].serves(b.lo) or verify(name, b.representative_m)  # packs on first need
                if reason:
                    result.excluded[name] = reason
                else:
                    passing.append(name)
            if not passing:
                raise NoKernel("every candidate failed verification: " + "; ".join(f"{k}: {r}" for k, r in result.excluded.items()))
            if config.autotune and config.autotune_lazy and len(passing) > 1:
                result.winner = LAZY + "+".join(passing)
                result.note = "tuned at the first call of this bin"
            elif config.autotune and compute_bound(b, spec, timed_below_m) and timed_below and timed_below.winner in passing:
                # one call here costs seconds, and a GEMM's ranking no longer changes with M
                result.winner = timed_below.winner
                result.note = f"compute-bound from M={b.lo}: the ranking of bin {timed_below.bin}"
                self.cache.put({key: {"winner": result.winner, "times_us": {}, "excluded": result.excluded}})
            elif config.autotune and len(passing) > 1 and self.timing_left_s > 0:
                native.settle()  # no compiler beside the timed kernels
                torch.manual_seed(0)
                rows = timing_rows(b, spec)
                if rows < spec.n and part is None:
                    part = _WeightPart(weight, spec, bias, rows)
                tspec, tpacked, tbias = (part.spec, part.packed, part.bias) if rows < spec.n else (spec, packed, bias)
                per_rows = spec.n / rows  # times are given for the whole weight
                m = timing_m(b, tspec)
                x = torch.randn(m, spec.k, dtype=spec.act_dtype)
                deadline = time.perf_counter() + self.timing_left_s
                samplers = {}  # kernel -> its timing with copies and repeats, for a second sample
                for name in static_order(b, passing, spec):  # likely winners first: they set the bar
                    if time.perf_counter() > deadline:
                        break
                    ratio, below = behind.get(name, (0.0, m))
                    # time grows at most linearly in M, so r times the best at M=below is at least
                    # r * below / m times it at a larger m (at a smaller one the bound says nothing)
                    if m >= below and ratio * below / m > HOPELESS_RATIO:
                        result.excluded[name] = f"not timed: {ratio:.1f}x the best at M={below}, so at least {ratio * below / m:.1f}x at M={m}"
                        behind[name] = (ratio * below / m, m)  # the bound carries on to the next bin
                        continue
                    if tpacked[name] is None:
                        result.excluded[name] = f"first {rows} rows: {tpacked.excluded.get(name, 'prepack failed')}"
                        continue
                    first_us = _first_call_us(KERNELS[name], x, tpacked[name], tbias, tspec) * per_rows
                    if result.times_us and first_us > HOPELESS_RATIO * min(result.times_us.values()):
                        result.times_us[name] = round(first_us, 1)  # hopeless: no copies, no repeats
                        continue
                    if (name, rows) not in copies:  # made at the smallest M, which needs the most
                        copies[name, rows] = weight_copies(tpacked[name], m)

                    def sample(name, first_us=first_us):
                        # a prefix: the copies of M=1 at M=476 made each sample 8 calls of ~60 ms
                        cycle = copies[name, rows][:copies_needed(tpacked[name], m)]
                        took = time_kernel(KERNELS[name], x, cycle, tbias, tspec, config.autotune_reps, first_us / per_rows)
                        return round(took * per_rows, 1)

                    result.times_us[name] = sample(name)
                    samplers[name] = sample
                _second_samples(result.times_us, samplers, deadline)
                self.timing_left_s = deadline - time.perf_counter()
                if rows < spec.n:
                    result.note = f"timed on the first {rows} of {spec.n} rows at M={m}, times x{per_rows:.3g}"
                if result.times_us and all(name in result.times_us or name in result.excluded for name in passing):
                    result.winner = min(result.times_us, key=result.times_us.get)
                    best = result.times_us[result.winner]
                    behind.update((name, (t / best, m)) for name, t in result.times_us.items())
                    timed_below, timed_below_m = result, m
                    self.cache.put({key: {"winner": result.winner, "times_us": result.times_us, "excluded": result.excluded}})
                else:  # the budget ran out in the middle of this bin, or nothing could be timed
                    result.winner = static_choice(b, passing, spec)
                    result.note = "autotune budget spent; static rule" if result.times_us or time.perf_counter() > deadline else "no candidate timed; static rule"
                if m != b.representative_m:
                    result.note = result.note or f"timed at M={m}: the bin is compute-bound there already"
            else:
                result.winner = static_choice(b, passing, spec)
                result.note = "static rule" if not config.autotune or len(passing) == 1 else "autotune budget spent; static rule"
            result.seconds = round(time.perf_counter() - started, 3)
            results.append(result)
        plan = Plan(spec, tuple(b.hi for b in bins[:-1]), tuple(r.winner for r in results))
        return Tuning(plan, results, excluded, _kept(packed, plan))


# contenders this far behind the best get a second sample: the disturbance below put the fastest
# kernel 2.2x behind; 10x (fp32 GEMMs on weights dequantized per call, at M=1) is not noise
SECOND_SAMPLE_RATIO = 4


def _second_samples(times_us: dict, samplers: dict, deadline: float) -> None:
    """Time the contenders again, in reverse order, and keep each one's better time.

    One sequence of samples a kernel lets a disturbance that falls on one kernel's turn (the other
    core busy, page faults on a fresh packing) decide the bin: a SmolLM2 compile ranked
    zen_w4_avx512 at 164.9 us against zen_w4_avx2's 75.7 for gate/up at M=1, where every other
    compile measured 46-49 against 62-83, and that choice cost 1.5 ms of a 9 ms decode step.
    """
    if len(samplers) < 2:
        return
    best = min(times_us[name] for name in samplers)
    for name in reversed(list(samplers)):
        if time.perf_counter() > deadline:
            return
        if times_us[name] <= SECOND_SAMPLE_RATIO * best:
            times_us[name] = min(times_us[name], samplers[name](name))


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
    memory_bound = {name for m in range(1, HUGE_PAGE_MAX_M + 1) for name in plan.kernels_for(m)}
    moved = {id(packed[name]) for name in memory_bound}
    placed = {}

    def move(t):
        return t if not isinstance(t, torch.Tensor) or t.untyped_storage().data_ptr() in own else on_huge_pages(t)

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


def _remember_lazy_choice(plan: Plan, index: int, usable: list, winner: str, times: dict) -> None:
    """A lazily tuned bin's winner goes to the same persistent cache as compile-time choices."""
    b = shape_bins(plan.edges)[index]
    TuningCache().put({cache_key(plan.spec, b, usable): {"winner": winner, "times_us": {k: round(v, 1) for k, v in times.items()},
                                                         "excluded": {}, "lazy": True}})
    log.info("zen: M bin %s of %s N=%d K=%d tuned at first call: %s", b.label, plan.spec.kind, plan.spec.n, plan.spec.k, winner)


on_lazy_choice(_remember_lazy_choice)


TIMING_MAX_FLOP = 4e9  # per timed call; past this a GEMM's ranking no longer changes with M


def timing_m(b: ShapeBin, spec: LinearSpec) -> int:
    """The bin's representative M, capped so that one call stays within ~4 GFLOP."""
    cap = max(b.lo, int(TIMING_MAX_FLOP / (2 * spec.n * spec.k)))
    return min(b.representative_m, cap)


COMPUTE_BOUND_FROM_M = 256  # past this every candidate's time grows in proportion to M here


def compute_bound(b: ShapeBin, spec: LinearSpec, below_m: int) -> bool:
    """The open bin's smallest M exceeds the timing cap and the bin below was timed at an M where
    every kernel is compute-bound already: its ranking holds here too. (Below ~256 rows the
    weight's dequantization, a fixed cost per call, still decides between GEMV-style kernels
    and dequantize + sgemm: reusing the ranking of the 17-64 bin for 65-256 cost a 1B model's
    prefill 27%; on a 16384 x 2048 weight int4_tiles_sgemm and zen_w4_avx2 tie at M=256 and
    the first is 1.25x faster at M=476, so a bounded bin is always timed.)"""
    return b.hi is None and 2 * b.lo * spec.n * spec.k > TIMING_MAX_FLOP and below_m >= COMPUTE_BOUND_FROM_M


# A wide weight is timed on its first TIMING_ROWS output rows in the bins from
# STATIC_DENSE_FROM_M rows up: there every candidate's time grows in proportion to N (measured
# on 16384 x 2048 and 32000 x 2048 weights at M=64-476: whole against 2048 rows times N/2048,
# within the 10% runs vary here, for every kernel), and timing the whole of a 32000-row weight
# at M=257 cost ~0.5 s a candidate. Decode bins time the whole weight: there the time is
# reading it from memory.
TIMING_ROWS = 2048


def timing_rows(b: ShapeBin, spec: LinearSpec) -> int:
    if b.representative_m >= STATIC_DENSE_FROM_M and spec.n > TIMING_ROWS:
        return TIMING_ROWS
    return spec.n


class _WeightPart:
    """The first ``rows`` output rows of a weight as a linear of their own, packed per kernel on
    first use (a swiglu weight keeps gate and up blocks in turn, so its first rows are one too)."""

    def __init__(self, weight, spec: LinearSpec, bias, rows: int):
        self.spec = dataclasses.replace(spec, n=rows)
        self.bias = bias[:rows] if bias is not None else None
        self.packed = _Packings(weight.rows(rows), self.spec, {})


VERIFY_MAX_M = 256  # rows checked against the reference; kernels' large-M paths start well below


class _Verifier:
    """``verify(kernel, m) -> reason | None``: the kernel's output on this weight against fp32."""

    def __init__(self, spec, weight, bias, packed):
        self.spec, self.bias, self.packed, self.weight = spec, bias, packed, weight
        self.threshold = SQNR_DYNAMIC_DB if spec.dynamic_activation else SQNR_WEIGHT_ONLY_DB
        self.verdicts: dict = {}

    @functools.cached_property
    def row_counts(self) -> tuple:
        # three row counts reach a kernel's distinct paths (GEMV, small and blocked GEMM); the
        # largest is capped near 1 GFLOP so a slow candidate cannot stall the compile
        return 1, 16, max(16, min(VERIFY_MAX_M, int(1e9 / (2 * self.spec.n * self.spec.k))))

    def __call__(self, name: str, m: int) -> Optional[str]:
        m = 1 if m == 1 else 16 if m <= 16 else self.row_counts[-1]
        if (name, m) not in self.verdicts:
            self.verdicts[name, m] = self._check(name, m)
        return self.verdicts[name, m]

    @functools.cached_property
    def references(self) -> dict:
        """m -> (x, fp32 reference output) for every row count, made on the first check (not at
        all when the tuning is memoized). One pass over the weight a block of rows at a time: the
        whole fp32 weight came from fresh pages (~0.5 s a GB here) and was read once per m."""
        xs = {}
        for m in sorted(set(self.row_counts)):
            torch.manual_seed(m)
            xs[m] = torch.randn(m, self.spec.k, dtype=self.spec.act_dtype)
        x32 = torch.cat(list(xs.values())).to(torch.float32)
        ref = torch.empty((x32.shape[0], self.spec.n), dtype=torch.float32)
        for w, start, end in fp32_row_blocks(self.spec.n, self.spec.k):
            self.weight.dequantize_rows(w, start, end)
            torch.mm(x32, w.t(), out=ref[:, start:end])
        if self.bias is not None:
            ref += self.bias.to(torch.float32)
        out, row = {}, 0
        for m, x in xs.items():
            out[m] = (x, epilogue_reference(ref[row:row + m], self.spec))
            row += m
        return out

    def _check(self, name, m):
        x, ref = self.references[m]
        if self.packed[name] is None:
            return "prepack failed"
        try:
            db = sqnr_db(run_kernel(KERNELS[name], x, self.packed[name], self.bias, self.spec), ref)
        except Exception as e:
            return f"failed: {type(e).__name__}: {e}"
        return None if db >= self.threshold else f"SQNR {db:.1f} dB < {self.threshold:.0f} dB against the fp32 reference"


@dataclass
class Tuning:
    plan: Plan
    bins: list  # BinResult per shape bin
    excluded: dict  # kernel -> reason it was never a candidate
    packed: dict  # kernel of the plan -> its packed tensors
