"""Timing a kernel as a model calls it: back to back, on weights kept out of cache (decode reads
them from DRAM in a real model), with the rules that keep a compile's timing short (hopeless
candidates, slow calls, the M and the rows a bin is timed at), and whether other processes
shared the machine meanwhile."""
from __future__ import annotations

import os
import resource
import statistics
import time
from typing import Optional

from .kernels import Kernel, LinearSpec, run_kernel
from .bins import STATIC_DENSE_FROM_M, ShapeBin

_COLD_BYTES = 64 << 20  # weights cycled through per timing sample: more than this machine's caches
_MAX_COPIES = 8


def copies_needed(packed: list, m: int) -> int:
    """How many copies of a packed weight cycling through keeps it out of cache at ``m`` rows."""
    if m >= STATIC_DENSE_FROM_M:  # compute-bound: where the weight sits hardly matters
        return 1
    nbytes = sum(t.numel() * t.element_size() for t in packed)
    return max(1, min(_MAX_COPIES, _COLD_BYTES // max(nbytes, 1)))


def weight_copies(packed: list, m: int, repack=None) -> list:
    """Enough copies of a packed weight that cycling through them keeps it out of cache.

    Calls run back to back, as in a model: flushing the cache between calls instead lets the
    OpenMP threads fall asleep, and their wake-up (about 100 us here) swamps a decode GEMM.
    Copies are clones, not new packings (packing again cost 6 s of a 1B-shape compile), except
    for a kernel whose packing is pinned (``repack``: a new packing each).
    """
    copy = repack or (lambda: [t.clone() for t in packed])
    return [packed] + [copy() for _ in range(copies_needed(packed, m) - 1)]


def first_call_us(kernel: Kernel, x, packed, bias, spec) -> float:
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
        return first_call_us(kernel, x, copies[0], bias, spec)
    t0 = time.perf_counter()
    # warm-up: lazy init, allocator (clones are touched); a pinned kernel's packings are each new to
    # it (zentorch's dynamic int8 GEMM timed 179 us cold against 132 with every packing seen once)
    for packed in copies if getattr(kernel, "pinned", False) else copies[:1]:
        run_kernel(kernel, x, packed, bias, spec)
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


# contenders this far behind the best get a second sample: the disturbance below put the fastest
# kernel 2.2x behind; 10x (fp32 GEMMs on weights dequantized per call, at M=1) is not noise
SECOND_SAMPLE_RATIO = 4


def second_samples(times_us: dict, samplers: dict, deadline: float) -> None:
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


# other processes (and the hypervisor's steal) taking this much of the machine's CPU time while a
# bin is timed make its times those of a shared machine: kept for this compile, not on disk. A
# tuning beside a build on both cores stored a 77 us GEMV as 12.8 ms, and every later compile read it
CONTENDED_SHARE = 0.25


def _cpu_ticks() -> Optional[tuple]:
    """(busy ticks of all CPUs, how many CPUs) from /proc/stat, or None where it cannot be read."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    fields = [int(v) for v in lines[0].split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait, steal included
    return busy, sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# CPU time is counted in 10 ms ticks: a shorter window says nothing, and windows of 50-70 ms beside
# two busy processes read 38-63% of the machine, now and then little enough to pass for quiet (on
# Zen 5 a bin of a 2048 x 2048 int8 linear was timed in ~60 ms; the tuning then kept it)
MIN_WINDOW_S = 0.1


class OtherLoad:
    """What share of the machine's CPU time others took from now to ``share()``: everything busy
    on every CPU, less this process's own time (its threads, spinning ones too)."""

    def __init__(self):
        self.ticks, self.own, self.wall = _cpu_ticks(), _own_cpu_s(), time.perf_counter()

    def share(self) -> float:
        wall = time.perf_counter() - self.wall
        if wall < MIN_WINDOW_S:  # the rest of the window waited for (no CPU of ours): too few ticks to tell
            time.sleep(MIN_WINDOW_S - wall)
        end = _cpu_ticks()
        wall = time.perf_counter() - self.wall
        if self.ticks is None or end is None:
            return 0.0
        busy_s = (end[0] - self.ticks[0]) / os.sysconf("SC_CLK_TCK")
        return max(0.0, busy_s - (_own_cpu_s() - self.own)) / (wall * end[1])


# what a compile waits, in all, for other processes to let go before it times a contended bin again:
# a fresh process's first tuning met Inductor's compile workers starting up (importing torch on
# both cores: a 108 us GEMV timed 296), which takes a few seconds and ends
QUIET_WAIT_S = 10.0


def wait_for_quiet(tuner) -> bool:
    """Wait, within ``tuner.quiet_wait_left_s``, for a quarter second in which other processes
    take under half ``CONTENDED_SHARE`` of the machine: whether one came."""
    t0 = time.perf_counter()
    try:
        while time.perf_counter() - t0 < tuner.quiet_wait_left_s:
            window = OtherLoad()
            time.sleep(0.25)
            if window.share() < CONTENDED_SHARE / 2:
                return True
        return False
    finally:
        tuner.quiet_wait_left_s = max(0.0, tuner.quiet_wait_left_s - (time.perf_counter() - t0))
