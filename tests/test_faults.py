"""What a user can do to a compiled model at run time, and what zen then does."""
import threading

import pytest
import torch

import zen_inductor

from conftest import compile_zen, quantize, sqnr
from quantized import fp32_weight

K, N = 256, 192


def _int4_model(group=32):
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(K, N)).to(torch.bfloat16).eval()
    return quantize(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group)))


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
