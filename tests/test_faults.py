"""What a user can do to a compiled model at run time, and what zen then does."""
import threading

import pytest
import torch

import zen_inductor

from conftest import any_rows, compile_zen, quantize, sqnr
from quantized import fp32_weight

K, N = 256, 192


def _int4_config(group=32):
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group))


def _int4_model(group=32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(K, N)).to(torch.bfloat16).eval()
    return quantize(model, _int4_config(group))


def _reference(model, x):
    return x.float() @ fp32_weight(model[0].weight).t() + model[0].bias.float()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs_spread_as_in_eager(bad):
    """A NaN or an infinity in a row of x leaves that row's outputs non-finite, as eager's; the
    other rows stay right."""
    model = _int4_model()
    fast = compile_zen(model)
    with torch.no_grad():
        for rows in (1, 6):
            x = torch.randn(rows, K).to(torch.bfloat16)
            x[0, 17] = bad
            y, eager = fast(x), model(x)
            assert torch.equal(torch.isfinite(y).all(dim=1), torch.isfinite(eager).all(dim=1)), (bad, rows)
            assert not torch.isfinite(y[0]).all()
            if rows > 1:
                assert sqnr(y[1:], _reference(model, x[1:])) >= 40
    assert zen_inductor.counters["dequant_matmul"] >= 1


def test_thread_count_changed_after_compiling():
    """torch.set_num_threads after the compile: the kernels run on the threads asked for now
    (OpenMP's, which torch sets), with the same answer."""
    model = _int4_model()
    fast = compile_zen(model)
    before = torch.get_num_threads()
    x = torch.randn(3, K).to(torch.bfloat16)
    try:
        with torch.no_grad():
            y_before = fast(x)
            for threads in (1, max(2, before)):
                torch.set_num_threads(threads)
                assert sqnr(fast(x), _reference(model, x)) >= 40
                assert torch.allclose(fast(x).float(), y_before.float(), rtol=1e-2, atol=1e-2)
    finally:
        torch.set_num_threads(before)


def test_one_compiled_model_called_from_two_threads_at_once():
    """Python threads sharing a compiled model: each call gets its own answer (the kernels'
    scratch is per calling thread)."""
    model = _int4_model()
    fast = compile_zen(model)
    with torch.no_grad():
        fast(torch.randn(2, K).to(torch.bfloat16))  # compiled before the threads start
    inputs = [torch.randn(m, K).to(torch.bfloat16) for m in (1, 2, 5, 1, 3, 7)]
    results, errors = {}, []

    def worker(i):
        try:
            with torch.no_grad():
                for _ in range(20):
                    results[i] = fast(inputs[i])
        except Exception as e:  # reported below, with the thread's input
            errors.append((i, e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, x in enumerate(inputs):
        assert sqnr(results[i], _reference(model, x)) >= 40, i


def test_a_cache_directory_that_cannot_be_written(tmp_path, caplog):
    """The tuning cache cannot be created (its path runs through a file; permissions would not
    stop root): the compile tunes, warns, and computes right."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    model = _int4_model()
    x = torch.randn(3, K).to(torch.bfloat16)
    with zen_inductor.config.patch(cache_dir=str(blocker / "zen")), torch.no_grad(), caplog.at_level("WARNING", "zen_inductor"):
        y = compile_zen(model)(x)
    assert zen_inductor.counters["dequant_matmul"] == 1
    assert sqnr(y, _reference(model, x)) >= 40
    assert any("could not write autotune cache" in r.getMessage() for r in caplog.records)


def test_a_model_moved_to_another_dtype_is_compiled_again():
    """``model.to(dtype)`` after compiling: Dynamo sees the parameters' new dtype and compiles
    again, on the weights as they are now; the answer is the moved model's."""
    model = _int4_model()
    fast = compile_zen(model)
    with torch.no_grad():
        x = torch.randn(3, K).to(torch.bfloat16)
        assert fast(x).dtype == torch.bfloat16
        first = zen_inductor.last_report()["graph"]
        model.to(torch.float32)
        y = fast(x.float())
    assert y.dtype == torch.float32 and zen_inductor.last_report()["graph"] != first  # a second compile
    assert zen_inductor.counters["dequant_matmul"] >= 2
    assert sqnr(y, model(x.float())) >= 40


@pytest.mark.parametrize("kernels", [(), ("aten_int4pack_mm",), ("zen_w4_avx2",)], ids=["tuned", "plan", "native"])
def test_weights_replaced_in_place_after_compiling_are_not_seen(kernels):
    """Documented (README, Limits): weights and biases are frozen, so a compiled model keeps
    computing with the values it was compiled on after they are overwritten in place;
    ``torch._dynamo.reset()`` and a new compile take the new ones. This test holds zen to what the
    README says, through the op's plan and through a direct C++ call (the bias reached both live
    from the model once, and the tuner's choice decided what a user saw)."""
    model = _int4_model()
    x = torch.randn(3, K).to(torch.bfloat16)
    with torch.no_grad(), zen_inductor.config.patch(kernel_allow=kernels):
        fast = compile_zen(model)
        before = fast(x)
        assert zen_inductor.counters["dequant_matmul"] == 1
        model[0].bias.add_(1.0)  # in place: the same tensor, new values
        assert torch.equal(fast(x), before)
        torch._dynamo.reset()
        assert sqnr(compile_zen(model)(x), _reference(model, x)) >= 40


_WITHOUT_A_COMPILER = """
import sys, torch
sys.path.insert(0, {tests!r})
import zen_inductor
from conftest import sqnr
from quantized import HandDequant, K
m = HandDequant(64, True, 4).eval()
x = torch.randn(3, K, dtype=torch.bfloat16)
with torch.no_grad():
    y = torch.compile(m, backend="zen")(x)
    print("kernels:", sorted(set(zen_inductor.last_report()["matches"][0]["kernels"].values())))
    print("sqnr:", sqnr(y, m(x)))
"""


def test_no_cpp_compiler_is_a_logged_fallback(tmp_path):
    """No C++ compiler (CXX names none): each of our libraries warns once that it could not be
    built and its kernels are skipped; the linear runs on ATen's or zentorch's kernels, right. (A
    graph that needs Inductor's own C++ kernels meets Inductor's error naming the compiler, as
    stock Inductor does.)"""
    import os
    import subprocess
    import sys

    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), ZEN_INDUCTOR_CACHE_DIR=str(tmp_path / "zen"),
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    out = subprocess.run([sys.executable, "-c", _WITHOUT_A_COMPILER.format(tests=os.path.dirname(__file__))],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    kernels = next(line for line in out.stdout.splitlines() if line.startswith("kernels:"))
    assert "zen_" not in kernels and "tiles" not in kernels, kernels
    assert float(out.stdout.strip().splitlines()[-1].split()[-1]) >= 40
    warnings = [line for line in out.stderr.splitlines() if "could not build" in line]
    assert warnings and all("its kernels are skipped" in w for w in warnings), out.stderr[-3000:]
    assert len(warnings) == len(set(warnings)), warnings  # once a library


def test_no_bf16_copy_where_it_would_leave_too_little_memory(monkeypatch):
    """A bf16 copy of a weight (for a prefill GEMM) is made only while the machine keeps
    config.memory_reserve of its memory available; past that the linear keeps its int4 kernels."""
    from zen_inductor import allocator, config
    from zen_inductor.cpu import native_bf16_gemm, zentorch_unavailable

    total_kb = 24 << 20
    monkeypatch.setattr(allocator, "_meminfo_kb", lambda: {"MemTotal": total_kb, "MemAvailable": total_kb // 4 + 1024})
    assert allocator.memory_short_of(512 << 10) is None  # 0.5 MB: still above a quarter
    assert "config.memory_reserve (25%)" in allocator.memory_short_of(2 << 20)
    with config.patch(memory_reserve=0.0):
        assert allocator.memory_short_of(2 << 20) is None
    model = _int4_model()
    x = torch.randn(300, K).to(torch.bfloat16)  # a prefill bin, where a copy's GEMM would compete
    monkeypatch.setattr(allocator, "_meminfo_kb", lambda: {"MemTotal": total_kb, "MemAvailable": total_kb // 4})
    with torch.no_grad():
        y = compile_zen(model)(x)
    report = zen_inductor.last_report()
    reason = report["autotune"][0]["excluded"]["zentorch_linear_dequantized"]
    if native_bf16_gemm() and not zentorch_unavailable():  # else zentorch's own reason comes first
        assert "config.memory_reserve" in reason, reason
    assert "zentorch_linear_dequantized" not in report["matches"][0]["kernels"].values()
    assert sqnr(y, _reference(model, x)) >= 40


def test_a_bf16_copy_leaves_room_for_the_packings_still_to_come(monkeypatch):
    """A copy that fits now but would leave the compile's remaining packings short is not made:
    checked against memory_reserve alone, an 8B model's copies left 1 GB of 24 for the rest.
    materialize tells the tuner what the linears after this one still need."""
    from zen_inductor import allocator, autotune
    from zen_inductor.kernels import LinearSpec, candidates

    spec = LinearSpec(n=N, k=K, group_size=32, bits=4, symmetric=True, act_dtype=torch.bfloat16)
    total_kb, copy = 24 << 20, 2 * N * K
    monkeypatch.setattr(allocator, "_meminfo_kb", lambda: {"MemTotal": total_kb, "MemAvailable": total_kb // 4 + 2 * copy // 1024})
    copies = {k.name for k in candidates(spec)[0] if k.copy_bytes_per_weight}
    _, excluded = candidates(spec, packings_ahead=2 * copy)
    assert all("config.memory_reserve" in excluded[name] for name in copies), excluded
    # the ahead materialize passes: the largest linear first, with what the smaller one will need
    aheads = []
    plan = autotune.Tuner.plan
    monkeypatch.setattr(autotune.Tuner, "plan", lambda self, spec, w, b, ahead=0, *rest: aheads.append((spec.n, ahead)) or plan(self, spec, w, b, ahead, *rest))
    model = quantize(torch.nn.Sequential(torch.nn.Linear(K, 2 * K), torch.nn.Linear(2 * K, K)).to(torch.bfloat16).eval(),
                     _int4_config())
    with torch.no_grad():
        compile_zen(model)(any_rows(torch.randn(3, K).to(torch.bfloat16)))
    assert [n for n, _ in aheads] == [2 * K, K] and aheads[1][1] == 0
    assert K * 2 * K <= aheads[0][1] <= 2 * K * 2 * K  # two layouts of the second: its codes at 4 bits and its scales


def test_zentorch_int8_copy_is_made_only_where_memory_holds_it(monkeypatch):
    """zentorch's dynamic int8 GEMM reads a packing of its own, an int8 copy beside the model's
    rows, which the own-rows GEMMs and GEMVs read as they lie: like the bf16 copies it is a
    candidate only while config.memory_reserve of the machine's memory stays available."""
    from zen_inductor import allocator
    from zen_inductor.cpu import zentorch_unavailable
    from zen_inductor.kernels import LinearSpec, candidates

    spec = LinearSpec(n=N, k=K, group_size=K, bits=8, symmetric=True, act_dtype=torch.bfloat16, dynamic_activation=True)
    total_kb = 24 << 20
    monkeypatch.setattr(allocator, "_meminfo_kb", lambda: {"MemTotal": total_kb, "MemAvailable": total_kb // 2})
    plenty = [k.name for k in candidates(spec)[0]]
    monkeypatch.setattr(allocator, "_meminfo_kb", lambda: {"MemTotal": total_kb, "MemAvailable": total_kb // 4})
    ok, excluded = candidates(spec)
    short = [k.name for k in ok]
    assert "zentorch_dynamic_qlinear" not in short  # the own rows still serve:
    assert {"aten_int_mm_da8", "zen_a8w8_gemm_avx2"} & set(short)  # _int_mm where it is exact, ours
    if zentorch_unavailable() is None:
        assert "zentorch_dynamic_qlinear" in plenty
        assert "config.memory_reserve" in excluded["zentorch_dynamic_qlinear"], excluded


def test_the_forecast_of_packings_to_come_learns_from_those_made():
    """A linear keeps two layouts at least (decode and prefill bins); where the packings so far
    took more than that against the least packing's bytes, the forecast for the linears after
    scales by what was seen, copies aside."""
    from types import SimpleNamespace

    from zen_inductor.packing_forecast import PackingForecast, least_packing_bytes
    from zen_inductor.kernels import LinearSpec

    specs = [LinearSpec(n=n, k=K, group_size=32, bits=4, symmetric=True, act_dtype=torch.bfloat16) for n in (4 * N, 2 * N, N)]
    least = [least_packing_bytes(s) for s in specs]
    forecast = PackingForecast(specs)
    assert forecast.after(specs[0]) == 2 * (least[1] + least[2])  # nothing seen yet: two layouts
    three_layouts = [torch.empty(least[0], dtype=torch.uint8) for _ in range(3)]
    copy = [torch.empty(2 * specs[0].n * K, dtype=torch.uint8)]
    forecast.packed(specs[0], SimpleNamespace(packed={"zen_w4_avx512": three_layouts[:1], "zen_w4_avx2": three_layouts[1:2],
                                                      "zentorch_woq_linear": three_layouts[2:], "aten_linear_dequantized": copy}))
    assert forecast.after(specs[1]) == 3 * least[2]


@pytest.mark.parametrize("available_fraction,reads", [(0.9, 1), (1 / 3, 2)])
def test_readings_are_kept_for_packing_only_while_memory_is_plentiful(monkeypatch, available_fraction, reads):
    """A weight's reading is kept from the pattern to its packing while half the machine's memory
    is available; below that it is read again for packing and the freed heap handed back."""
    import importlib

    from zen_inductor import allocator, graph_pass

    dequant_matmul = importlib.import_module("zen_inductor.patterns.dequant_matmul")
    total_kb = 24 << 20
    monkeypatch.setattr(allocator, "_meminfo_kb", lambda: {"MemTotal": total_kb, "MemAvailable": int(total_kb * available_fraction)})
    calls, trims = [], []
    read = dequant_matmul.read_weight
    monkeypatch.setattr(dequant_matmul, "read_weight", lambda *a: calls.append(1) or read(*a))
    monkeypatch.setattr(graph_pass, "release_freed_memory", lambda: trims.append(1))
    model = _int4_model()
    x = torch.randn(5, K).to(torch.bfloat16)
    with torch.no_grad():
        y = compile_zen(model)(x)
    assert len(calls) == reads and bool(trims) == (reads == 2)
    assert sqnr(y, _reference(model, x)) >= 40


def test_a_bf16_model_decodes_on_its_own_weight_where_a_packed_copy_would_not_fit(monkeypatch):
    """The packed copies of a bf16 weight (2 bytes a weight: the model again) count against
    config.memory_reserve like the prefill copies; short of memory, decode runs on the module's
    own [N, K] weight (zen_bf16_rows_avx512 with AVX512-BF16, zen_bf16_gemv_avx2 without)."""
    from zen_inductor import allocator, native
    from zen_inductor.kernels import KERNELS, LinearSpec, candidates

    spec = LinearSpec(n=N, k=K, group_size=K, bits=16, symmetric=True, act_dtype=torch.bfloat16)
    total_kb = 24 << 20
    monkeypatch.setattr(allocator, "_meminfo_kb", lambda: {"MemTotal": total_kb, "MemAvailable": total_kb // 4})
    ok, excluded = candidates(spec)
    for copying in ("zen_bf16_gemv_avx512", "zen_bf16_blocks_avx2"):
        assert copying not in [k.name for k in ok]
    own_weight = "zen_bf16_rows_avx512" if native.unavailable("bf16_gemv_avx512") is None else "zen_bf16_gemv_avx2"
    if own_weight == "zen_bf16_rows_avx512":
        assert "config.memory_reserve" in excluded["zen_bf16_gemv_avx512"]
    torch.manual_seed(0)
    model = torch.nn.Linear(K, N, bias=False).to(torch.bfloat16).eval()
    x = torch.randn(1, K, dtype=torch.bfloat16)
    with torch.no_grad():
        y = compile_zen(model)(x)
    assert own_weight in [k.name for k in ok]
    # whichever the tuning picks (zentorch's linear also reads the model's weight where it runs),
    # no kernel of the plan holds a copy
    kernels = set(zen_inductor.last_report()["matches"][0]["kernels"].values())
    assert not kernels & {"zen_bf16_gemv_avx512", "zen_bf16_blocks_avx2"}
    assert all(KERNELS[name].copy_bytes_per_weight == 0 for name in kernels)
    assert sqnr(y, x.float() @ model.weight.float().t()) >= 45
