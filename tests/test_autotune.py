"""Shape bins, per-call dispatch, the verification gate's cache path, and the persistent cache."""
import copy
import dataclasses
import json
import logging
import multiprocessing
import os
import subprocess
import sys
import time

import pytest
import torch

import zen_inductor
from zen_inductor import autotune, config, native, timing
from zen_inductor.bins import STATIC_DENSE_FROM_M, shape_bins, static_order
from zen_inductor.kernels import KERNELS, Plan, candidates
from zen_inductor.tuning_cache import TuningCache
from zen_inductor.verification import Verifier

from conftest import any_rows, compile_zen, compiled_graphs, reports_since, sqnr
from quantized import HandDequant, K, N, a8w4_spec, int4_weight


@pytest.fixture(autouse=True)
def _avx2_gemvs_in_every_bin(request):
    """The tuner's mechanics need several candidates in the bins above M=4. Where the AVX-512
    GEMVs and zentorch's bf16 copy both serve, the AVX2 GEMVs are pruned (they win no bin) and
    the test model's prefill bins keep one candidate: these tests leave the AVX-512 ones out."""
    if request.node.get_closest_marker("all_kernels"):
        yield
        return
    with config.patch(kernel_deny=("zen_w4_avx512", "zen_w8_avx512")):
        yield


def test_bins_cover_every_m_once():
    bins = shape_bins((1, 4, 16))
    assert [b.label for b in bins] == ["1", "2-4", "5-16", "17+"]
    plan = Plan.decode(
        "n=8;k=32;g=32;bits=4;sym=1;act=bfloat16;da8=0;edges=1,4,16;bins=a,b,c,d"
    )
    assert [plan.kernel_for(m) for m in (1, 2, 4, 5, 16, 17, 10_000)] == ["a", "b", "b", "c", "c", "d", "d"]
    assert Plan.decode(plan.encode()) == plan


def test_one_graph_serves_every_bin(monkeypatch):
    calls = []
    for name in ("aten_int4pack_mm", "dequant_sgemm"):
        kernel = KERNELS[name]
        spy = lambda x, p, b, s, run=kernel.run, n=name: calls.append((n, x.shape[0])) or run(x, p, b, s)  # noqa: E731
        monkeypatch.setitem(KERNELS, name, dataclasses.replace(kernel, run=spy, dominated_by=(), layout="", epilogues=(),
                                                               native="", residual=False))
    m = HandDequant(64, True, 4).eval()
    compiles_before = compiled_graphs()
    compiled = compile_zen(m, autotune=False, kernel_allow=("aten_int4pack_mm", "dequant_sgemm"))
    x = torch.randn(8, K, dtype=torch.bfloat16)
    torch._dynamo.mark_dynamic(x, 0)
    with torch.no_grad():
        compiled(x)
        for rows in (2, 40, 100, 700):
            x = torch.randn(rows, K, dtype=torch.bfloat16)
            assert sqnr(compiled(x), x.float() @ m.reference_weight().t()) >= 40
    assert len(reports_since(compiles_before)) == 1  # one graph, no recompiles
    ran = dict((rows, name) for name, rows in calls)
    assert ran[2] == ran[40] == ran[100] == "aten_int4pack_mm"  # static rule: quantized kernel up to M=256
    assert ran[700] == "dequant_sgemm"  # dequantize + dense GEMM above


_COMPILE_IN_A_NEW_PROCESS = """
import json, torch, zen_inductor
from torch._dynamo.utils import counters
torch.manual_seed({seed})
class M(torch.nn.Module):  # three quantized linears: several packed constants in one graph
    def __init__(self):
        super().__init__()
        for i in range(3):
            self.register_buffer(f"q{{i}}", torch.randint(-8, 8, (192, 256), dtype=torch.int8))
            self.register_buffer(f"s{{i}}", torch.rand(192, 4, 1, dtype=torch.bfloat16) * 0.01)
    def weight(self, i):
        return (getattr(self, f"q{{i}}").view(192, 4, 64).to(torch.bfloat16) * getattr(self, f"s{{i}}")).view(192, 256)
    def forward(self, x):
        return sum(torch.nn.functional.linear(x, self.weight(i)) for i in range(3))
m, x = M(), torch.randn(3, 256, dtype=torch.bfloat16)
with torch.no_grad():
    y = torch.compile(m, backend="zen")(x).float()
ref = sum(x.float() @ m.weight(i).float().t() for i in range(3))
sqnr = float(10 * torch.log10(ref.pow(2).mean() / (y - ref).pow(2).mean()))
bins = zen_inductor.last_report()["autotune"][0]["bins"]
print(json.dumps({{"cached": [b["cached"] for b in bins], "notes": [b["note"] for b in bins],
                  "fx_graph_cache_hits": counters["inductor"]["fxgraph_cache_hit"], "sqnr": sqnr}}))
"""

# the note of a bin timed while other processes took the CPUs, which the tuning cache does not keep
_NOT_KEPT = "not kept in the tuning cache"


def _compile_elsewhere(cache_dir, seed=0):
    # another hash seed per process: nothing in a cache key may depend on Python's string hashing;
    # a budget no loaded CI machine spends: this is about what the cache keeps, not the budget
    env = {**os.environ, "ZEN_INDUCTOR_CACHE_DIR": str(cache_dir), "TORCHINDUCTOR_CACHE_DIR": str(cache_dir / "inductor"),
           "PYTHONHASHSEED": str(seed + 1), "ZEN_INDUCTOR_AUTOTUNE_BUDGET_S": "600"}
    out = subprocess.run([sys.executable, "-c", _COMPILE_IN_A_NEW_PROCESS.format(seed=seed)], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_process_tunes_and_generates_nothing(tmp_path):
    first = _compile_elsewhere(tmp_path, seed=0)
    assert not any(first["cached"]) and first["fx_graph_cache_hits"] == 0
    # every bin with a choice is stored (bins with one candidate take it: "static rule", not stored),
    # but one timed while other processes took the CPUs, which its note says
    stored = ["static rule" not in note and _NOT_KEPT not in note for note in first["notes"]]
    assert any(stored) and all(s or note == "static rule" or _NOT_KEPT in note
                               for s, note in zip(stored, first["notes"])), first["notes"]
    second = _compile_elsewhere(tmp_path, seed=1)  # other weights, same shapes
    # ... and the second process takes each of them from the cache, verified on its own weight
    assert [c for c, s in zip(second["cached"], stored) if s] == [True] * sum(stored), (first["notes"], second["notes"])
    assert second["fx_graph_cache_hits"] == 1  # Inductor's code from its FX graph cache
    assert first["sqnr"] >= 40 and second["sqnr"] >= 40  # ... running this process's weights


@pytest.mark.parametrize("content", ["{not json", json.dumps({"version": -1, "entries": {}}), json.dumps([1, 2])])
def test_corrupt_or_foreign_cache_is_rebuilt(tmp_path, caplog, content):
    cache = tmp_path / "zen-cache"
    cache.mkdir()
    (cache / "autotune.json").write_text(content)
    m = HandDequant(64, True, 4).eval()
    x = any_rows(torch.randn(3, K, dtype=torch.bfloat16))
    with caplog.at_level(logging.WARNING, logger="zen_inductor"), config.patch(cache_dir=str(cache)), torch.no_grad():
        y = compile_zen(m)(x)
    assert sqnr(y, x.float() @ m.reference_weight().t()) >= 40
    assert any("unreadable" in r.getMessage() for r in caplog.records)
    rebuilt = json.loads((cache / "autotune.json").read_text())
    contended = sum(_NOT_KEPT in r.getMessage() for r in caplog.records)  # bins timed beside other processes
    assert rebuilt["version"] >= 1 and len(rebuilt["entries"]) == len(shape_bins()) - contended


def test_cached_winner_must_pass_on_this_weight(tmp_path, monkeypatch):
    """A cache naming a kernel that is wrong for these weights does not get it chosen."""
    m = HandDequant(64, True, 4).eval()
    x = torch.randn(3, K, dtype=torch.bfloat16)
    with torch.no_grad():
        compile_zen(m)(x)
    winners = set(zen_inductor.last_report()["matches"][0]["kernels"].values())
    broken = next(iter(winners))
    kernel = KERNELS[broken]
    monkeypatch.setitem(KERNELS, broken, kernel.__class__(kernel.name, kernel.source, kernel.supports, kernel.prepack,
                                                          lambda x, p, b, s: torch.zeros(x.shape[0], s.n, dtype=x.dtype)))
    torch._dynamo.reset()
    m = copy.deepcopy(m)  # same values, new tensors: only the on-disk cache remembers the winner
    with torch.no_grad():
        y = compile_zen(m)(x)
    assert all(b["cached"] is False or b["winner"] != broken for b in zen_inductor.last_report()["autotune"][0]["bins"])
    assert broken not in zen_inductor.last_report()["matches"][0]["kernels"].values()
    assert sqnr(y, x.float() @ m.reference_weight().t()) >= 40


def test_changed_kernel_source_is_tuned_again(monkeypatch):
    """Times measured with other code of our kernels are stale: the cache key holds the sources."""
    from zen_inductor import tuning_cache

    before = tuning_cache.machine_key()
    monkeypatch.setattr(native, "source_digest", lambda: "other-source")
    assert tuning_cache.machine_key() != before


def _writer(directory, worker):
    cache = TuningCache(directory)
    for i in range(25):
        cache.put({f"w{worker}-{i}": {"winner": "dequant_sgemm", "times_us": {"dequant_sgemm": float(i)}}})


def test_concurrent_writers_keep_every_entry(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    entries = json.loads((tmp_path / "autotune.json").read_text())["entries"]
    assert len(entries) == 100
    assert TuningCache(str(tmp_path)).get("w3-24")["winner"] == "dequant_sgemm"


def test_lazy_tuning_at_first_call_of_each_bin(tmp_path):
    m = HandDequant(64, True, 4).eval()
    cache = tmp_path / "lazy-cache"
    with config.patch(autotune_lazy=True, cache_dir=str(cache), kernel_allow=("aten_int4pack_mm", "dequant_sgemm")):
        compiled = compile_zen(m)
        x = torch.randn(8, K, dtype=torch.bfloat16)
        torch._dynamo.mark_dynamic(x, 0)
        with torch.no_grad():
            y = compiled(x)
            entries_after_one_bin = json.loads((cache / "autotune.json").read_text())["entries"]
            compiled(torch.randn(300, K, dtype=torch.bfloat16))
        entries = json.loads((cache / "autotune.json").read_text())["entries"]
    bins = zen_inductor.last_report()["autotune"][0]["bins"]
    assert all(b["winner"].startswith("lazy:") for b in bins)  # nothing timed at compile time
    assert len(entries_after_one_bin) == 1 and len(entries) == 2  # one bin per first call
    assert all(e["winner"] in ("aten_int4pack_mm", "dequant_sgemm") for e in entries.values())
    assert sqnr(y, x.float() @ m.reference_weight().t()) >= 40


@pytest.mark.all_kernels
def test_dominated_kernels_are_left_out_with_the_reason():
    from zen_inductor import native
    from zen_inductor.cpu import native_bf16_gemm
    from zen_inductor.kernels import LinearSpec, candidates

    spec = LinearSpec(n=256, k=512, group_size=128, bits=4, symmetric=True, act_dtype=torch.bfloat16)
    names = lambda kernels: {k.name for k in kernels}  # noqa: E731
    kernels, excluded = candidates(spec)
    if "zentorch_linear_dequantized" in names(kernels) and native_bf16_gemm():  # Zen 4: the bf16 copy's GEMM
        assert excluded["int4_tiles_sgemm"].startswith("zentorch_linear_dequantized computes the same, faster")
        assert excluded["dequant_sgemm"].startswith("zentorch_linear_dequantized computes the same, faster")
    elif native.unavailable("tiles_dequant") is None:
        assert "dequant_sgemm" not in names(kernels) and "int4_tiles_sgemm" in names(kernels)
        assert excluded["dequant_sgemm"].startswith("int4_tiles_sgemm computes the same, faster")
    if {"zen_w4_avx512", "zentorch_linear_dequantized"} <= names(kernels):  # AVX512-VNNI, zentorch
        # decode on the AVX-512 GEMV, prefill on the bf16 copy: the AVX2 GEMV wins no bin
        assert excluded["zen_w4_avx2"].startswith("zen_w4_avx512 and zentorch_linear_dequantized compute the same")
        assert excluded["zentorch_woq_linear"].startswith("zen_w4_avx2 and zentorch_linear_dequantized compute the same")
        with config.patch(dequantized_copies=False):  # without the copy the AVX2 GEMV serves the middle bins
            assert {"zen_w4_avx2", "zentorch_woq_linear"} <= names(candidates(spec)[0])
    if {"zen_w4_avx2", "zen_w4_avx512"} & (names(kernels) | set(excluded)) and native.unavailable("woq_avx2") is None:
        assert excluded["aten_int4pack_mm"].startswith("zen_w4_avx2 computes the same, faster")
        with config.patch(kernel_deny=("zen_w4_avx2", "zen_w4_avx512")):
            assert "aten_int4pack_mm" in names(candidates(spec)[0])
    if not native_bf16_gemm():
        assert "no native bf16 GEMM" in excluded["dequant_gemm"]
    with config.patch(prune_dominated_kernels=False):
        assert {"dequant_sgemm", "dequant_gemm"} <= names(candidates(spec)[0])
    # the faster ones denied: the other serves
    with config.patch(kernel_deny=("int4_tiles_sgemm", "zentorch_linear_dequantized")):
        assert "dequant_sgemm" in names(candidates(spec)[0])
    int8 = LinearSpec(n=256, k=512, group_size=512, bits=8, symmetric=True, act_dtype=torch.float32)
    if native.unavailable("tiles_dequant") is None:  # fp32 activations: no bf16 copy
        assert candidates(int8)[1]["dequant_sgemm"].startswith("int8_tiles_sgemm computes the same")
    odd = LinearSpec(n=256, k=96, group_size=96, bits=8, symmetric=True, act_dtype=torch.float32)
    assert "dequant_sgemm" in names(candidates(odd)[0])  # K=96 fits no tile layout: nothing dominates it
    int8_bf16 = dataclasses.replace(int8, act_dtype=torch.bfloat16)
    if {"zen_w8_avx512", "zentorch_linear_dequantized"} <= names(candidates(int8_bf16)[0]):
        assert candidates(int8_bf16)[1]["aten_int8pack_mm"].startswith("zen_w8_avx512 and zentorch_linear_dequantized")
    else:  # nothing to stand in for it
        assert "aten_int8pack_mm" in names(candidates(int8_bf16)[0])


def test_compute_bound_bins_take_the_ranking_of_the_bin_below(monkeypatch):
    n_k = 192 * K  # HandDequant's weight
    monkeypatch.setattr(timing, "TIMING_MAX_FLOP", 2 * 20 * n_k)  # bins from M=21 up are "compute-bound"
    m = HandDequant(64, True, 4).eval()
    with torch.no_grad():
        compile_zen(m)(any_rows(torch.randn(3, K, dtype=torch.bfloat16)))
    bins = {b["bin"]: b for b in zen_inductor.last_report()["autotune"][0]["bins"]}
    # past the cap, bins are still timed (at their smallest M) until one was timed at M >= 256:
    # below that the fixed cost of dequantizing a weight can still change the ranking
    for label in ("17-64", "65-256", "257-1024"):
        assert bins[label]["times_us"] and not bins[label]["note"].startswith("compute-bound"), label
    assert bins["1025+"]["times_us"] == {}
    assert bins["1025+"]["note"] == "compute-bound from M=1025: the ranking of bin 257-1024"
    assert bins["1025+"]["winner"] == bins["257-1024"]["winner"]


def test_budget_counts_kernel_timing_only(monkeypatch):
    """Reading, packing and verifying weights happen with or without tuning: they do not spend
    the budget (a first compile that builds kernels and reads many weights still tunes)."""
    from types import SimpleNamespace

    clock, timings = [0.0], [0]
    monkeypatch.setattr(autotune, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    check = Verifier.check

    def slow_check(self, name, m, *sampled):  # each verification: 100 s of the fake clock
        clock[0] += 100.0
        return check(self, name, m, *sampled)

    def timed(kernel, x, copies, bias, spec, reps, first_us=0.0):  # each timing: 0.4 s, a fixed ranking
        clock[0] += 0.4
        timings[0] += 1
        return 10.0 + len(kernel.name)

    monkeypatch.setattr(Verifier, "check", slow_check)
    monkeypatch.setattr(timing, "time_kernel", timed)
    monkeypatch.setattr(timing, "first_call_us", lambda *args: 1.0)
    m = HandDequant(64, True, 4).eval()
    with config.patch(autotune_budget_s=2.0), torch.no_grad():
        compile_zen(m)(any_rows(torch.randn(3, K, dtype=torch.bfloat16)))
    bins = zen_inductor.last_report()["autotune"][0]["bins"]
    assert bins[0]["times_us"] and "budget" not in bins[0]["note"]
    assert bins[-1]["note"] == "autotune budget spent; static rule"
    assert 2.0 <= 0.4 * timings[0] <= 2.0 + 0.4 + 1e-9  # the budget, and at most the one timing that crossed it


def test_kernels_are_timed_only_once_every_started_build_is_done(monkeypatch):
    """A C++ build still running on one of two cores slowed timed candidates unevenly (2x) and
    turned the ranking of the int4 prefill bins around: the tuner waits for builds first."""

    events = []
    time_kernel = timing.time_kernel
    monkeypatch.setattr(native, "settle", lambda: events.append("settle"))
    monkeypatch.setattr(timing, "time_kernel", lambda *a, **kw: events.append("time") or time_kernel(*a, **kw))
    with torch.no_grad():
        compile_zen(HandDequant(64, True, 4).eval())(torch.randn(3, K, dtype=torch.bfloat16))
    assert "time" in events and events[0] == "settle"
    assert all(events[i - 1] in ("settle", "time") for i, e in enumerate(events) if e == "time")


def test_a_kernel_far_behind_is_not_timed_where_it_cannot_catch_up(monkeypatch):
    """A kernel r times slower than the best at M1 is at least r * M1 / M2 slower at M2 (its
    time does not fall with M, the best's grows at most in proportion): while that bound is over
    HOPELESS_RATIO the kernel is skipped, with the reason, and timed again once it is not."""

    timed = []

    def fake_us(kernel):  # one kernel 12x behind at every M: the bound shrinks bin by bin
        timed.append(kernel.name)
        return 1200.0 if kernel.name == slow else 100.0

    monkeypatch.setattr(timing, "first_call_us", lambda kernel, *args: fake_us(kernel))
    monkeypatch.setattr(timing, "time_kernel", lambda kernel, *args, **kw: fake_us(kernel))
    model = HandDequant(64, True, 4).eval()
    usable = [k.name for k in candidates(_int4_g64_spec())[0]]
    assert len(usable) > 1
    slow = static_order(shape_bins()[0], usable, _int4_g64_spec())[-1]  # tried after the best
    with torch.no_grad():
        compile_zen(model)(any_rows(torch.randn(3, K, dtype=torch.bfloat16)))
    bins = zen_inductor.last_report()["autotune"][0]["bins"]
    assert slow in bins[0]["times_us"]  # M=1: 12x behind
    m2 = timing.timing_m(shape_bins()[1], _int4_g64_spec())
    assert bins[1]["excluded"][slow] == f"not timed: 12.0x the best at M=1, so at least {12 / m2:.1f}x at M={m2}"
    assert slow not in bins[1]["times_us"] and bins[1]["winner"]
    assert any(slow in b["times_us"] for b in bins[2:])  # the bound fell under 2x: timed again
    assert timed.count(slow) < len([b for b in bins if b["times_us"]])
    assert all(b["winner"] != slow for b in bins)


def _int4_g64_spec():
    from zen_inductor.kernels import LinearSpec

    return LinearSpec(n=N, k=K, group_size=64, bits=4, symmetric=False, act_dtype=torch.bfloat16)


def test_a_slow_candidate_is_timed_once_more_only(monkeypatch):
    """Past SLOW_CALL_US the call that found a candidate's first time also warmed it: one warm
    call gives its time; faster candidates get a warm-up and ``reps`` samples."""

    calls = []
    monkeypatch.setattr(timing, "run_kernel", lambda *args: calls.append(1))
    timing.time_kernel(None, None, [None], None, None, reps=5, first_us=2 * timing.SLOW_CALL_US)
    assert len(calls) == 1
    calls.clear()
    timing.time_kernel(None, None, [None], None, None, reps=5, first_us=timing.SLOW_CALL_US / 10)
    assert len(calls) == 1 + 5


def test_compute_bound_bins_time_one_copy_of_the_weight(monkeypatch):
    """Copies of a weight keep it out of cache for decode bins; from STATIC_DENSE_FROM_M rows
    a bin cycles one copy (the M=1 copies at M=476 made each sample 8 slow calls)."""

    cycled = {}
    time_kernel = timing.time_kernel

    def recording(kernel, x, copies, bias, spec, reps, first_us=0.0):
        cycled[x.shape[0]] = max(cycled.get(x.shape[0], 0), len(copies))
        return time_kernel(kernel, x, copies, bias, spec, reps, first_us)

    monkeypatch.setattr(timing, "time_kernel", recording)
    m = HandDequant(64, True, 4).eval()
    with config.patch(autotune_budget_s=60.0), torch.no_grad():  # the fixture gives an empty cache
        compile_zen(m)(any_rows(torch.randn(3, K, dtype=torch.bfloat16)))
    assert cycled[1] > 1  # a small weight: several copies at decode
    assert all(n == 1 for rows, n in cycled.items() if rows >= STATIC_DENSE_FROM_M), cycled


def test_compute_bound_bins_of_a_wide_weight_are_timed_on_its_first_rows(monkeypatch):
    """From STATIC_DENSE_FROM_M rows a GEMM's time grows in proportion to N: a wide weight is
    timed on its first TIMING_ROWS rows there, times scaled to the whole; decode bins time the
    whole weight. The plan still runs (and was verified on) the whole weight."""

    rows_at = {}
    time_kernel = timing.time_kernel

    def recording(kernel, x, copies, bias, spec, reps, first_us=0.0):
        rows_at.setdefault(x.shape[0], set()).add(spec.n)
        return time_kernel(kernel, x, copies, bias, spec, reps, first_us)

    monkeypatch.setattr(timing, "time_kernel", recording)
    monkeypatch.setattr(timing, "TIMING_ROWS", 64)
    m = HandDequant(64, True, 4).eval()
    x = any_rows(torch.randn(300, K, dtype=torch.bfloat16))
    with config.patch(autotune_budget_s=60.0), torch.no_grad():
        y = compile_zen(m)(x)
    assert sqnr(y, m(x)) >= 40
    assert N > 64 and rows_at[1] == {N}
    assert all(n == {64} for rows, n in rows_at.items() if rows >= STATIC_DENSE_FROM_M), rows_at
    bins = {b["bin"]: b for b in zen_inductor.last_report()["autotune"][0]["bins"]}
    for label in ("17-64", "65-256", "257-1024"):
        assert bins[label]["note"].startswith(f"timed on the first 64 of {N} rows at M="), bins[label]
        assert bins[label]["times_us"] and bins[label]["winner"] in bins[label]["times_us"]
    assert "first 64" not in bins["1"]["note"]


def test_the_bf16_gemm_is_pruned_only_where_both_faster_kernels_serve():
    import dataclasses

    from zen_inductor import native
    from zen_inductor.cpu import native_bf16_gemm
    from zen_inductor.kernels import LinearSpec, candidates

    if native_bf16_gemm() or native.unavailable("bf16_gemv_avx2") is not None:
        pytest.skip("the prune applies to CPUs without a native bf16 GEMM, with our GEMV built")
    spec = LinearSpec(n=256, k=512, group_size=512, bits=16, symmetric=True, act_dtype=torch.bfloat16)
    names = lambda: [k.name for k in candidates(spec)[0]]  # noqa: E731
    assert "dense_mm" not in names() and "zen_bf16_gemv_avx2" in candidates(spec)[1]["dense_mm"]
    with config.patch(kernel_deny=("zen_bf16_gemv_avx2",)):  # decode would have only dense_sgemm: dense_mm stays
        assert "dense_mm" in names()
    odd = dataclasses.replace(spec, k=500, group_size=500)  # no GEMV for K % 8: dense_mm stays
    assert "dense_mm" in [k.name for k in candidates(odd)[0]]
    with config.patch(prune_dominated_kernels=False):
        assert "dense_mm" in names()


def test_the_bf16_gemvs_are_pruned_where_zentorchs_bf16_gemm_serves():
    from zen_inductor.cpu import native_bf16_gemm
    from zen_inductor.kernels import LinearSpec, candidates

    spec = LinearSpec(n=256, k=512, group_size=512, bits=16, symmetric=True, act_dtype=torch.bfloat16)
    kernels, excluded = candidates(spec)
    if native_bf16_gemm() and "zentorch_linear" in {k.name for k in kernels}:
        for gemv in ("zen_bf16_gemv_avx2", "zen_bf16_blocks_avx2"):
            assert excluded[gemv].startswith("zentorch_linear computes the same, faster"), excluded[gemv]
    else:  # no AVX512-BF16 GEMM here: the GEMVs are the decode kernels, unless they cannot build
        assert all("computes the same" not in excluded.get(g, "") for g in ("zen_bf16_gemv_avx2", "zen_bf16_blocks_avx2"))
    with config.patch(kernel_deny=("zentorch_linear",)):
        assert all("computes the same" not in candidates(spec)[1].get(g, "") for g in ("zen_bf16_gemv_avx2", "zen_bf16_blocks_avx2"))


def test_gemv_kernels_are_offered_only_up_to_their_largest_m():
    from zen_inductor import native

    if native.unavailable("bf16_gemv_avx2") is not None:
        pytest.skip("needs our bf16 GEMV (AVX2 and a C++ compiler)")
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(K, 256, bias=False)).to(torch.bfloat16).eval()
    x = any_rows(torch.randn(3, K, dtype=torch.bfloat16))
    with torch.no_grad(), config.patch(kernel_deny=("zentorch_linear",)):  # which prunes the GEMVs where it serves
        y = compile_zen(m)(x)
    assert sqnr(y, m(x)) >= 40
    (entry,) = [a for a in zen_inductor.last_report()["autotune"] if "bins" in a]
    bins = {b["bin"]: b for b in entry["bins"]}
    gemv = "zen_bf16_gemv_avx2"
    assert gemv in bins["1"]["times_us"] and gemv in bins["17-64"]["times_us"]
    for label in ("65-256", "257-1024", "1025+"):
        assert bins[label]["excluded"][gemv] == "a GEMV, offered up to M=64", label
        assert bins[label]["winner"] != gemv


def test_verification_reference_is_made_in_row_blocks(monkeypatch):
    """The verifier's reference (x @ W^T + bias in fp32, epilogue applied) for every row count
    comes from one pass over the weight a block of rows at a time; three blocks with a tail here."""
    from zen_inductor.kernels import LinearSpec, QuantWeight, apply_epilogue, weights

    monkeypatch.setattr(weights, "FP32_BLOCK_BYTES", 4 * 256 * 40)  # 40 rows a block: 112 = 40 + 40 + 32
    n, k, g = 112, 256, 64
    w = QuantWeight(torch.randint(-8, 8, (n, k), dtype=torch.int8), torch.rand(n, k // g), torch.randn(n, k // g),
                    None, g, 4)
    bias = torch.randn(n)
    for epilogue in ("", "swiglu"):
        spec = LinearSpec(n, k, g, 4, False, torch.bfloat16, epilogue=epilogue)
        refs = Verifier(spec, w, bias, packed={}).references
        assert sorted(refs) == [1, 16, 256]
        for m, (x, ref) in refs.items():
            full = x.float() @ w.dequantize().t() + bias
            assert ref.shape == (m, spec.out_n)
            torch.testing.assert_close(ref, apply_epilogue(full, spec), rtol=1e-4, atol=1e-3)


def test_a_kernel_that_passed_on_one_weight_is_checked_on_a_sample_of_the_next_ones_rows():
    """A kernel is verified in full once a shape and compile: on the other weights of that shape
    (a 1B model's 15 more layers of each) it is checked on a sample of W's rows, its output on
    their real packing against fp32 for those rows (SwiGLU's outputs too), which still catches a
    weight it gets wrong, without the pass over the whole weight a full reference takes."""
    from zen_inductor.kernels import LinearSpec, QuantWeight

    n, k, g = 1024, 256, 64
    kernel = KERNELS["dequant_sgemm"]

    def weight(seed, flipped=None):
        gen = torch.Generator().manual_seed(seed)
        codes = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
        if flipped is not None:
            codes[flipped] = -codes[flipped]
        scale = torch.rand(n, k // g, generator=gen) * 0.01 + 1e-3
        return QuantWeight(codes, scale, torch.zeros_like(scale), None, g, 4)

    for epilogue in ("", "swiglu"):
        spec = LinearSpec(n, k, g, 4, True, torch.float32, epilogue=epilogue)
        passed = set()

        def verifier(w, packed_from=None):
            return Verifier(spec, w, None, {kernel.name: kernel.prepack(packed_from or w, spec.act_dtype)}, passed)

        first = verifier(weight(0))
        assert first(kernel.name, 1) is None and first(kernel.name, 16) is None and "references" in vars(first)
        second = verifier(weight(1))
        assert second(kernel.name, 1) is None and second(kernel.name, 16) is None
        assert "references" not in vars(second) and second.sample.numel() == 256
        wrong = verifier(weight(1), packed_from=weight(1, flipped=second.sample[:16]))  # one sampled tile wrong
        reason = wrong(kernel.name, 1)
        assert reason and reason.endswith(f"({256 if not epilogue else 128} of its outputs)"), reason


def test_a_bf16_dequantization_is_the_fp32_one_rounded():
    """Made through fp32 row blocks (no whole fp32 copy): the same values as fp32, then bf16."""
    from zen_inductor.kernels import QuantWeight, weights

    n, k, g = 3 * (weights.FP32_BLOCK_BYTES // (4 * 256)) + 5, 256, 64  # several blocks and a partial one
    w = QuantWeight(torch.randint(-8, 8, (n, k), dtype=torch.int8), torch.rand(n, k // g), torch.randn(n, k // g) * 0.01,
                    None, g, 4)
    assert torch.equal(w.dequantize(torch.bfloat16), w.dequantize().to(torch.bfloat16))


def _huge_page_kb(address: int) -> int:
    """AnonHugePages of the mapping holding ``address``, from /proc/self/smaps."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def test_packed_weights_are_kept_on_huge_pages_but_the_models_own_weight_is_not_copied():
    from zen_inductor.allocator import _transparent_huge_pages
    from zen_inductor.autotune import Tuner
    from zen_inductor.kernels import DenseWeight, LinearSpec


    w = int4_weight(4096, 2048, 128)  # 4 MB once packed: two huge pages
    with config.patch(kernel_allow=("aten_int4pack_mm",), autotune=False):
        packed = Tuner().plan(a8w4_spec(w, torch.bfloat16, dynamic=False), w, None).packed["aten_int4pack_mm"]
    reference = KERNELS["aten_int4pack_mm"].prepack(w, torch.bfloat16)
    assert torch.equal(packed[0], reference[0]) and torch.equal(packed[1], reference[1])
    if _transparent_huge_pages() in ("always", "madvise"):  # where the kernel offers none, it stays put
        assert packed[0].data_ptr() % (2 << 20) == 0
        assert _huge_page_kb(packed[0].data_ptr()) >= 4096

    dense = DenseWeight(torch.randn(2048, 2048, dtype=torch.bfloat16))
    spec = LinearSpec(n=2048, k=2048, group_size=0, bits=16, symmetric=True, act_dtype=torch.bfloat16)
    with config.patch(kernel_allow=("dense_sgemm",), autotune=False):
        packed = Tuner().plan(spec, dense, None).packed["dense_sgemm"]
    assert packed[0].data_ptr() == dense.weight.data_ptr()  # read in place, not held twice


def test_the_models_own_weight_read_in_place_is_put_on_huge_pages_where_it_lies():
    """Where kernels that read the model's tensor as it is are candidates, the tuner moves that
    tensor's whole 2 MB runs onto huge pages in place (MADV_COLLAPSE): decode reads it on them as
    it reads packings, and the model keeps its address and bytes. Not for a tensor the pass made."""
    from zen_inductor.allocator import HUGE_PAGE, _transparent_huge_pages
    from zen_inductor.autotune import Tuner
    from zen_inductor.kernels import DenseWeight, LinearSpec

    if _transparent_huge_pages() not in ("always", "madvise"):
        pytest.skip("this kernel offers no transparent huge pages")
    spec = LinearSpec(n=4096, k=2048, group_size=0, bits=16, symmetric=True, act_dtype=torch.bfloat16)
    for own in (False, True):
        dense = DenseWeight(torch.randn(4096, 2048, dtype=torch.bfloat16))  # 16 MB: at least 7 whole huge pages
        address, values = dense.weight.data_ptr(), dense.weight.clone()
        first = -(-address // HUGE_PAGE) * HUGE_PAGE
        storages = frozenset({dense.weight.untyped_storage().data_ptr()}) if own else frozenset()
        with config.patch(kernel_allow=("dense_sgemm",), autotune=False):
            packed = Tuner().plan(spec, dense, None, model_storages=storages).packed["dense_sgemm"]
        assert packed[0].data_ptr() == address and torch.equal(dense.weight, values)
        if own:
            assert _huge_page_kb(first) >= 7 * HUGE_PAGE // 1024
        else:
            assert _huge_page_kb(first) < 7 * HUGE_PAGE // 1024  # (or the test shows nothing)


def test_only_packings_serving_memory_bound_bins_are_copied_to_huge_pages(monkeypatch):
    # prefill GEMMs are bound by arithmetic: a copy of their packings (such as int4's bf16 copies)
    # would cost compile time and memory for nothing
    from zen_inductor.autotune import HUGE_PAGE_MAX_M, Tuner


    copied = []
    monkeypatch.setattr(autotune, "on_huge_pages", lambda t: copied.append(t.data_ptr()) or t)
    w = int4_weight(4096, 2048, 128)
    with config.patch(kernel_allow=("aten_int4pack_mm", "int4_tiles_sgemm"), autotune=False):  # ATen and ours: no zentorch needed
        tuning = Tuner().plan(a8w4_spec(w, torch.bfloat16, dynamic=False), w, None)
    decode, prefill = tuning.plan.kernel_for(HUGE_PAGE_MAX_M), tuning.plan.kernel_for(512)
    assert decode != prefill, tuning.plan.bin_kernels  # the static rule splits them; else the test says nothing
    assert sorted(copied) == sorted(t.data_ptr() for t in tuning.packed[decode])
    assert all(t.data_ptr() not in copied for t in tuning.packed[prefill])


def test_the_static_rule_puts_the_avx512_gemvs_first_at_decode():
    """With autotuning off (or bins the budget did not reach) each kernel's own rank decides: the
    AVX-512 GEMVs were named nowhere in the old rule and came last on the machines that have them."""
    from zen_inductor.kernels import LinearSpec

    decode, prefill = shape_bins()[0], shape_bins()[-1]
    for bits, names in ((4, ["aten_int4pack_mm", "zen_w4_avx2", "int4_tiles_sgemm", "zen_w4_avx512"]),
                        (8, ["aten_int8pack_mm", "zen_w8_avx2", "int8_tiles_sgemm", "zen_w8_avx512"])):
        spec = LinearSpec(n=256, k=256, group_size=64, bits=bits, symmetric=True, act_dtype=torch.bfloat16)
        assert static_order(decode, names, spec)[0] == f"zen_w{bits}_avx512"
        assert static_order(prefill, names, spec)[0] == f"int{bits}_tiles_sgemm"
    dense = LinearSpec(n=256, k=256, group_size=256, bits=16, symmetric=True, act_dtype=torch.bfloat16)
    assert static_order(decode, ["dense_mm", "zen_bf16_gemv_avx2", "zen_bf16_gemv_avx512"], dense)[0] == "zen_bf16_gemv_avx512"



def test_a_contender_disturbed_once_is_timed_again():
    """A single slow sequence of samples does not decide a bin: each contender gets a second one,
    in reverse order, and keeps its better time; a hopeless kernel is not timed again."""

    again = {"fast_but_disturbed": 46.0, "runner_up": 63.0, "hopeless": 900.0}
    asked = []

    def sampler(name):
        asked.append(name)
        return again[name]

    times = {"fast_but_disturbed": 164.9, "runner_up": 75.7, "hopeless": 1200.0}
    timing.second_samples(times, {name: sampler for name in times}, deadline=float("inf"))
    assert min(times, key=times.get) == "fast_but_disturbed"
    assert times == {"fast_but_disturbed": 46.0, "runner_up": 63.0, "hopeless": 1200.0}
    assert asked == ["runner_up", "fast_but_disturbed"]


def test_a_graph_at_one_m_tunes_only_its_bin():
    m = HandDequant(64, True, 4).eval()
    x = torch.randn(3, K, dtype=torch.bfloat16)
    with torch.no_grad():
        y = compile_zen(m)(x)
    assert sqnr(y, x.float() @ m.reference_weight().t()) >= 40
    (entry,) = zen_inductor.last_report()["autotune"]
    assert [b["bin"] for b in entry["bins"]] == ["2-4"]


def _result(label, winner, **times):
    return autotune.BinResult(label, winner, times_us=times)


def test_one_kernel_within_the_tolerance_in_every_bin_serves_them_all():
    bins = shape_bins((1, 4))  # 1, 2-4, 5+
    # the int4 tiles' GEMV wins M = 1 by 5%: the VNNI blocks serve all three, one packed copy
    results = [_result("1", "zen_w4_avx2", zen_w4_avx2=100.0, zen_w4_avx512=105.0),
               _result("2-4", "zen_w4_avx512", zen_w4_avx2=180.0, zen_w4_avx512=110.0),
               _result("5+", "zen_w4_avx512", zen_w4_avx512=900.0)]
    with config.patch(layout_tolerance=1.1):
        autotune._one_layout(bins, results)
    assert [r.winner for r in results] == ["zen_w4_avx512"] * 3
    assert "one layout: zen_w4_avx512 at 1.05x zen_w4_avx2's time" in results[0].note
    # 30% ahead: both layouts stay
    results = [_result("1", "zen_w4_avx2", zen_w4_avx2=100.0, zen_w4_avx512=130.0),
               _result("2-4", "zen_w4_avx512", zen_w4_avx2=180.0, zen_w4_avx512=110.0),
               _result("5+", "zen_w4_avx512", zen_w4_avx512=900.0)]
    with config.patch(layout_tolerance=1.1):
        autotune._one_layout(bins, results)
    assert [r.winner for r in results] == ["zen_w4_avx2", "zen_w4_avx512", "zen_w4_avx512"]
    # a bin where the other kernel was not timed keeps its winner: no merge on a guess
    results = [_result("1", "zen_w4_avx2", zen_w4_avx2=100.0),
               _result("2-4", "zen_w4_avx512", zen_w4_avx2=180.0, zen_w4_avx512=110.0),
               _result("5+", "zen_w4_avx512", zen_w4_avx512=900.0)]
    autotune._one_layout(bins, results)
    assert results[0].winner == "zen_w4_avx2"


def test_an_empty_x_compiles_and_runs():
    m = HandDequant(64, True, 4).eval()
    with torch.no_grad():
        y = compile_zen(m)(torch.randn(0, K, dtype=torch.bfloat16))
    assert y.shape == (0, m.reference_weight().shape[0])


@pytest.mark.all_kernels
@pytest.mark.parametrize("release_from", [0, None])
def test_a_one_bin_tuning_holds_one_candidates_packing_at_a_time(monkeypatch, tmp_path, release_from):
    """A big weight tuned for one bin (a graph at a fixed M) keeps a candidate's full packing only
    while it is verified, timed or the fastest so far: at most two side by side. Tuned for every
    bin, or below the size (None here), every candidate's packing lives to the plan's end."""
    import weakref

    if release_from is not None:
        monkeypatch.setattr(autotune, "RELEASE_FROM_WEIGHTS", release_from)
    w = int4_weight(512, K, 64)
    spec = a8w4_spec(w, torch.bfloat16, dynamic=False)
    live, most = [], [0]

    def counting(prepack):
        def wrapped(weight, act_dtype):
            out = prepack(weight, act_dtype)
            if weight.n == w.n:  # full packings (the timing of a part packs its first rows)
                live.append(weakref.ref(out[0]))
                most[0] = max(most[0], sum(ref() is not None for ref in live))
            return out
        return wrapped

    for name, kernel in list(KERNELS.items()):
        monkeypatch.setitem(KERNELS, name, dataclasses.replace(kernel, prepack=counting(kernel.prepack)))
    # every kernel that may run it, a faster one's prey too: enough packings for the count to
    # tell on an AVX2-only CPU as well (there the pruned set keeps one layout)
    with config.patch(prune_dominated_kernels=False):
        layouts = {k.layout or k.name for k in candidates(spec)[0]}
    assert len(layouts) >= 3, layouts
    with config.patch(cache_dir=str(tmp_path), autotune_budget_s=60.0, prune_dominated_kernels=False):
        tuning = autotune.Tuner().plan(spec, w, None, rows=1)
    if release_from is None:
        assert most[0] >= 3, most[0]
        return
    assert most[0] <= 2, most[0]
    winner = tuning.plan.kernels_for(1)[0]
    x = torch.randn(1, K, dtype=torch.bfloat16)
    y = KERNELS[winner].runner(spec)(x, tuning.packed[winner], None, spec)
    assert sqnr(y, x.float() @ w.dequantize().t()) >= 40


def test_a_later_graph_reads_the_packing_an_earlier_graph_holds(monkeypatch):
    """A prefill at one M and the decode at M = 1 are two graphs of one model: where the second
    chooses a layout the first packed, it reads the first's tensors (one copy of the weight, not
    two), and its kernels compute with them."""
    kernel = KERNELS["zen_w4_avx2"]
    packed_rows = []

    def counting(weight, act_dtype):
        packed_rows.append(weight.n)
        return kernel.prepack(weight, act_dtype)

    monkeypatch.setitem(KERNELS, kernel.name, dataclasses.replace(kernel, prepack=counting))
    torch.manual_seed(0)
    m = HandDequant(64, True, 4).eval()
    f = compile_zen(m, kernel_allow=(kernel.name,))
    before = compiled_graphs()
    with torch.no_grad():
        for rows in (5, 1):
            x = torch.randn(rows, K, dtype=torch.bfloat16)
            assert sqnr(f(x), m(x)) >= 40, rows
    assert len(compiled_graphs() - before) == 2
    assert packed_rows.count(N) == 1, packed_rows  # (timing copies are clones, not packings)


def test_a_layout_another_graph_holds_wins_within_the_tolerance():
    """Choosing between layouts, one that an earlier graph holds costs no memory: it wins every
    bin within ``config.layout_tolerance`` of the fastest, and not beyond."""
    bins = shape_bins()[:1]
    for ratio, winner in ((1.05, "zen_w4_avx512"), (1.3, "zen_w4_avx2")):
        results = [autotune.BinResult(bins[0].label, "zen_w4_avx2", {"zen_w4_avx2": 100.0, "zen_w4_avx512": 100.0 * ratio})]
        autotune._one_layout(bins, results, {"int4_blocks16": "the layout another graph holds"})
        assert results[0].winner == winner, ratio
        assert ("another graph holds" in results[0].note) == (ratio < 1.1)


def test_a_layout_that_is_the_models_own_weight_takes_each_bin_within_the_tolerance():
    """A layout that costs no memory (the model's own int8 rows) takes a bin where its fastest
    kernel is within ``config.layout_tolerance`` of the winner, bin by bin: the others keep
    theirs, and the rest still share one layout where they can."""
    bins = shape_bins((1, 4, 16))  # 1, 2-4, 5-16, 17+
    own = {"int8_rows": "the model's own weight"}
    results = [_result("1", "zen_w8_avx512", zen_w8_avx512=100.0, zen_a8w8_rows_avx2=108.0),
               _result("2-4", "zentorch_dynamic_qlinear", zentorch_dynamic_qlinear=100.0, zen_a8w8_rows_avx2=130.0),
               _result("5-16", "zentorch_dynamic_qlinear", zentorch_dynamic_qlinear=100.0, aten_int_mm_da8=109.0),
               _result("17+", "zentorch_dynamic_qlinear", zentorch_dynamic_qlinear=100.0, aten_int_mm_da8=140.0)]
    with config.patch(layout_tolerance=1.1):
        autotune._one_layout(bins, results, own)
    assert [r.winner for r in results] == ["zen_a8w8_rows_avx2", "zentorch_dynamic_qlinear", "aten_int_mm_da8",
                                           "zentorch_dynamic_qlinear"]
    assert results[0].note == "the model's own weight: zen_a8w8_rows_avx2 at 1.08x zen_w8_avx512's time"
    # not held, the model's rows are a layout like any other: nothing switches to them
    results = [_result("1", "zen_w8_avx512", zen_w8_avx512=100.0, zen_a8w8_rows_avx2=108.0),
               _result("2-4", "zentorch_dynamic_qlinear", zentorch_dynamic_qlinear=100.0, zen_a8w8_rows_avx2=130.0)]
    autotune._one_layout(bins[:2], results)
    assert [r.winner for r in results] == ["zen_w8_avx512", "zentorch_dynamic_qlinear"]


@pytest.mark.skipif(native.unavailable("a8w8_rows_avx2") is not None, reason="needs AVX2 and a C++ compiler")
def test_an_int8_dynamic_linear_decodes_on_the_models_own_rows_where_they_are_close_enough():
    """In a compile, the layout of kernels that read the reading as it is costs nothing where the
    reading is the model's tensor: with any tolerance, an own-rows kernel serves every bin it is
    offered in and the plan's packing is the module's own int8 tensor, not a copy."""
    from conftest import quantize
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    torch.manual_seed(0)
    linear = torch.nn.Linear(512, 256, bias=False).to(torch.bfloat16).eval()
    quantize(linear, Int8DynamicActivationInt8WeightConfig())
    own_rows = ("zen_a8w8_rows_avx2", "zen_a8w8_rows_avx512")
    allow = (*own_rows, "zen_w8_avx2", "zen_w8_avx512")
    with config.patch(kernel_allow=allow, layout_tolerance=1000.0), torch.no_grad():
        compiled = compile_zen(linear)
        x = torch.randn(3, 512, dtype=torch.bfloat16)
        assert sqnr(compiled(any_rows(x)), linear(x).float()) >= 30
    (entry,) = zen_inductor.last_report()["autotune"]
    offered = [b for b in entry["bins"] if KERNELS["zen_a8w8_rows_avx2"].serves(int(b["bin"].split("-")[0].rstrip("+"))) is None]
    assert offered and all(b["winner"] in own_rows for b in offered), entry["bins"]
    tunings = [t for key, t in linear.weight.qdata.__dict__["_zen_memo"].items() if key[0][0] == "tune"]
    own_packings = [t.packed[name][2] for t in tunings for name in own_rows if name in t.packed]
    assert own_packings and all(p.data_ptr() == linear.weight.qdata.data_ptr() for p in own_packings)


def test_timings_taken_beside_other_busy_processes_are_timed_again_or_not_kept(tmp_path, monkeypatch):
    """A bin timed while other processes take the cores ranks kernels by who got them (a build
    beside a compile stored a 77 us GEMV as 12.8 ms, read by every later compile). Such a bin is
    timed again once they let go, within the tuner's wait; where they do not, its winner serves
    this compile, says why in its note, and stays out of the tuning cache."""
    from conftest import quantize
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    def int8_linear():  # a new module each time: nothing this process tuned for it
        return quantize(torch.nn.Linear(2048, 2048, bias=False).to(torch.bfloat16).eval(), Int8DynamicActivationInt8WeightConfig())

    def busy():
        return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]

    def tuned_bin(processes):
        time.sleep(0.2)
        try:
            with config.patch(cache_dir=str(tmp_path)), torch.no_grad():
                compile_zen(int8_linear())(torch.randn(1, 2048, dtype=torch.bfloat16))
        finally:
            for p in processes:
                p.kill()
        (entry,) = zen_inductor.last_report()["autotune"]
        (one,) = entry["bins"]
        assert len(one["times_us"]) > 1, one
        return one

    def entries():
        path = tmp_path / "autotune.json"
        return json.loads(path.read_text())["entries"] if path.exists() else {}

    monkeypatch.setattr(timing, "QUIET_WAIT_S", 0.5)
    one = tuned_bin(busy())  # the load outlasts the wait
    assert _NOT_KEPT in one["note"], one
    assert not entries()
    monkeypatch.setattr(timing, "QUIET_WAIT_S", 30.0)
    processes, wait = busy(), timing.wait_for_quiet

    def let_go(tuner):  # the load ends while the tuner waits
        for p in processes:
            p.kill()
        return wait(tuner)

    monkeypatch.setattr(timing, "wait_for_quiet", let_go)
    one = tuned_bin(processes)
    assert "timed again once others let go" in one["note"] and "not kept" not in one["note"], one
    assert entries()


def test_tuning_leaves_torchs_random_state_alone(tmp_path):
    """Verification's inputs and the timed x come from generators of their own: a compile does
    not reseed the user's RNG (nor pay a global reseed per check)."""
    w = int4_weight(N, K, 64)
    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    with config.patch(cache_dir=str(tmp_path), autotune_budget_s=30.0):
        tuning = autotune.Tuner().plan(a8w4_spec(w, torch.bfloat16, dynamic=False), w, None)
    assert any(r.times_us for r in tuning.bins), "nothing was timed: the test would say nothing"
    assert torch.equal(torch.random.get_rng_state(), before)
