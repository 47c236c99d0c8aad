"""The backend as a user meets it: entry point, options, no leaks, freezing, FX-graph cache, config."""
import importlib.metadata
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import zen_inductor
from zen_inductor import config
from zen_inductor.graph_pass import ZenJointPass
from zen_inductor.patterns import FAMILIES
from zen_inductor.record import CompileRecord

from conftest import compile_zen, sqnr
from quantized import HandDequant, K

PYTHON = sys.executable


def _run(code: str, env=None) -> str:
    out = subprocess.run([PYTHON, "-c", textwrap.dedent(code)], capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_entry_point_is_declared():
    names = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="torch_dynamo_backends")}
    assert names.get("zen") == "zen_inductor:zen"


def test_backend_works_without_importing_zen_inductor():
    out = _run(
        """
        import sys, torch
        torch.manual_seed(0)
        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.register_buffer("q", torch.randint(-8, 8, (64, 128), dtype=torch.int8))
                self.register_buffer("s", torch.rand(64, 1, dtype=torch.bfloat16) * 0.01)
            def forward(self, x):
                return torch.nn.functional.linear(x, self.q.to(torch.bfloat16) * self.s)
        m = M()
        x = torch.randn(3, 128, dtype=torch.bfloat16)
        assert "zen_inductor" not in sys.modules
        with torch.no_grad():
            y = torch.compile(m, backend="zen")(x)
        import zen_inductor
        print(zen_inductor.counters["dequant_matmul"], float((y.float() - m(x).float()).abs().max()))
        """
    )
    count, err = out.split()
    assert count == "1" and float(err) < 0.05


def test_options_override_flags_for_one_compile_only():
    m = HandDequant(64, True, 4).eval()
    x = torch.randn(2, K, dtype=torch.bfloat16)
    with torch.no_grad():
        compile_zen(m, dequant_matmul=False)(x)
    assert zen_inductor.counters["dequant_matmul"] == 0
    assert config.dequant_matmul is True
    torch._dynamo.reset()
    with torch.no_grad():
        compile_zen(m)(x)
    assert zen_inductor.counters["dequant_matmul"] == 1


def test_inductor_options_pass_through():
    m = HandDequant(64, True, 4).eval()
    x = torch.randn(2, K, dtype=torch.bfloat16)
    with torch.no_grad():
        y = compile_zen(m, autotune=False, **{"cpp.simdlen": None})(x)
    assert zen_inductor.counters["dequant_matmul"] == 1
    assert sqnr(y, x.float() @ m.reference_weight().t()) >= 40


def test_no_global_state_leaks_into_stock_inductor():
    before = {k: getattr(torch._inductor.config, k) for k in ("joint_custom_post_pass", "joint_custom_pre_pass", "post_grad_custom_post_pass", "freezing")}
    m = HandDequant(64, True, 4).eval()
    x = torch.randn(2, K, dtype=torch.bfloat16)
    with torch.no_grad():
        compile_zen(m)(x)
        assert zen_inductor.counters["dequant_matmul"] == 1
        after = {k: getattr(torch._inductor.config, k) for k in before}
        assert after == before
        torch._dynamo.reset()
        zen_inductor.counters.clear()
        y = torch.compile(m, backend="inductor")(x)
    assert sum(zen_inductor.counters.values()) == 0  # our pass did not run
    assert sqnr(y, m(x)) >= 40


def test_freezing_is_on_under_no_grad():
    m = HandDequant(64, True, 4).eval()
    with torch.no_grad():
        compile_zen(m)(torch.randn(2, K, dtype=torch.bfloat16))
    report = zen_inductor.last_report()
    assert report["frozen"] is True
    assert torch._inductor.config.freezing is False


def test_global_freezing_flag_parameters_come_as_attributes(caplog):
    """With Inductor's global freezing flag on while Dynamo traces, parameters reach zen as graph
    attributes (guarded by identity, cheaper per call): nothing to lift, and the linear still fuses.
    With the flag off they come as inputs, are lifted, and the INFO log says what the flag gives."""
    import logging

    from conftest import quantize
    from quantized import TORCHAO, plain_linear, reference_output

    make_config, _ = TORCHAO["int8_weight_only"]
    m = quantize(plain_linear(), make_config())  # leaves Inductor's global settings alone
    x = torch.randn(3, K, dtype=torch.bfloat16)
    ref = reference_output(x, m[0].weight.dequantize(), m[0].bias)
    for global_flag in (True, False):
        torch._dynamo.reset()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="zen_inductor"), torch._inductor.config.patch(freezing=global_flag), \
                torch.no_grad():
            y = compile_zen(m)(x)
        assert "zen.quant_linear" in zen_inductor.last_report()["matches"][0]["replacement"]
        assert sqnr(y, ref) >= 40
        advised = any("came in as graph inputs" in r.getMessage() for r in caplog.records)
        assert advised is not global_flag


@pytest.mark.parametrize("asserts", [False, True])
def test_runtime_size_asserts_follow_the_flag(asserts):
    """Inductor's per-call size and stride checks are left out of zen's compiled code unless
    config.runtime_size_asserts, and Inductor's own flag stays as it was."""
    from torch._inductor.utils import run_and_get_code

    m = HandDequant(64, True, 4).eval()
    x = torch.randn(3, K, dtype=torch.bfloat16)
    with torch.no_grad():
        y, (code, *_) = run_and_get_code(compile_zen(m, runtime_size_asserts=asserts), x)
    assert "zen.quant_linear" in code or "zen_fast.linear(" in code  # M = 3: our C++ entry, called directly
    assert ("assert_size_stride(buf" in code) is asserts
    assert ("assert_size_stride(" in code) is asserts
    assert torch._inductor.config.size_asserts and torch._inductor.config.alignment_asserts
    assert sqnr(y, x.float() @ m.reference_weight().t()) >= 40


def test_cpp_wrapper_calls_the_fused_kernel():
    """Under Inductor's C++ wrapper (the CPU recipe's flag) the compiled code still calls
    zen.quant_linear, and it is right."""
    from torch.profiler import ProfilerActivity, profile

    m = HandDequant(64, True, 4).eval()
    x = torch.randn(3, K, dtype=torch.bfloat16)
    compiled = compile_zen(m, cpp_wrapper=True)
    with torch.no_grad():
        compiled(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            y = compiled(x)
    assert "zen.quant_linear" in zen_inductor.last_report()["matches"][0]["replacement"]
    assert [e.count for e in prof.key_averages() if e.key == "zen::quant_linear"] == [1]  # called at run time
    assert sqnr(y, x.float() @ m.reference_weight().t()) >= 40


def test_two_models_same_shapes_each_get_their_own_weights_with_caches_on():
    """Stock Inductor + freezing + max_autotune replays the first model's packed weights here.
    AOTAutograd's cache on too: it served the third compile (the first model again) without our
    pass, whose packed weights it then lacked."""
    x = torch.randn(4, K, dtype=torch.bfloat16)
    results = []
    with torch._inductor.config.patch(fx_graph_cache=True), torch._functorch.config.patch(enable_autograd_cache=True), \
            torch.no_grad():
        for seed in (0, 1, 0):
            torch.manual_seed(seed)
            m = HandDequant(64, True, 4).eval()
            torch._dynamo.reset()
            y = compile_zen(m)(x)
            results.append((y, x.float() @ m.reference_weight().t()))
        hits = torch._dynamo.utils.counters["inductor"]["fxgraph_cache_hit"]
    for y, ref in results:
        assert sqnr(y, ref) >= 40
    assert sqnr(results[0][0], results[1][0]) < 10  # really different models
    assert hits >= 1  # the second compile was served from the cache, and still right
    assert zen_inductor.counters["dequant_matmul"] == 3  # our pass ran every time


@pytest.mark.parametrize("inductor_freezing", [False, True])
def test_inductor_freezing_runs_only_when_asked(inductor_freezing, monkeypatch):
    """Our pass makes the weights it reads constants itself; Inductor's freezing (its fake-tensor
    propagation alone ~1.5 s a graph of a 1B model) runs after it only with the flag."""
    import torch._inductor.freezing as freezing

    calls = []
    real = freezing.freeze
    monkeypatch.setattr(freezing, "freeze", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = HandDequant(64, True, 4).eval()
    x = torch.randn(3, K, dtype=torch.bfloat16)
    with torch.no_grad():
        y = compile_zen(m, inductor_freezing=inductor_freezing)(x)
    assert len(calls) == int(inductor_freezing)
    assert zen_inductor.counters["dequant_matmul"] == 1 and zen_inductor.last_report()["frozen"] is True
    assert sqnr(y, x.float() @ m.reference_weight().t()) >= 40


def test_pass_uuid_follows_flags():
    p = ZenJointPass(CompileRecord("g"), FAMILIES)
    a = p.uuid()
    with config.patch(add_rmsnorm=False):
        b = p.uuid()
    assert a and b and a != b
    assert p.uuid() == a


def test_config_patch_as_decorator_and_context_manager():
    @config.patch(autotune=False)
    def inner():
        return config.autotune

    assert inner() is False
    with config.patch(shape_bin_edges=(1, 8)):
        assert config.shape_bin_edges == (1, 8)
    assert config.autotune is True


def test_environment_overrides():
    out = _run(
        "import zen_inductor as z; print(z.config.autotune, z.config.autotune_budget_s, z.config.shape_bin_edges, z.config.debug_dir)",
        env={"ZEN_INDUCTOR_AUTOTUNE": "0", "ZEN_INDUCTOR_AUTOTUNE_BUDGET_S": "2.5", "ZEN_INDUCTOR_SHAPE_BIN_EDGES": "1,8,64", "ZEN_INDUCTOR_DEBUG_DIR": "/tmp/x"},
    )
    assert out.split() == ["False", "2.5", "(1,", "8,", "64)", "/tmp/x"]


_CONFIGS_AROUND_A_COMPILE = """
import sys
import torch, torch._dynamo.config, torch._inductor.config
sys.path.insert(0, {tests!r})
from conftest import quantize
from torchao.quantization import IntxWeightOnlyConfig
from torchao.quantization.granularity import PerGroup

configs = (torch._inductor.config, torch._dynamo.config)
before = [c.get_config_copy() for c in configs]
torch.manual_seed(0)
m = quantize(torch.nn.Sequential(torch.nn.Linear(256, 128)).to(torch.bfloat16).eval(),
             IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
with torch.no_grad():
    torch.compile(m, backend="zen")(torch.randn(3, 256, dtype=torch.bfloat16))
import zen_inductor
assert zen_inductor.counters["dequant_matmul"] == 1, dict(zen_inductor.counters)
after = [c.get_config_copy() for c in configs]
print("zentorch imported:", "zentorch" in sys.modules)
print("changed:", sorted(k for b, a in zip(before, after) for k in set(b) | set(a) if b.get(k) != a.get(k)))
"""


def test_a_compile_leaves_inductor_and_dynamo_config_as_it_found_them(tmp_path):
    """In a fresh process (zentorch imported by zen during the compile where the CPU runs it, whose
    import writes into Inductor's config): every entry of both configs is the same after."""
    import os
    import subprocess
    import sys

    script = _CONFIGS_AROUND_A_COMPILE.format(tests=os.path.dirname(__file__))
    env = dict(os.environ, ZEN_INDUCTOR_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "changed: []", out.stdout


def test_ahead_of_time_compile_accepts_zen_and_saving_says_why_not(tmp_path):
    """Dynamo's ahead-of-time compile (vLLM's default way to call a backend) takes only a result that
    says how it is saved. Zen's runs, fused; saving it raises with the reason, which vLLM logs and
    goes on (a zen graph holds weights packed on this CPU, so each process compiles its own)."""
    m = HandDequant(64, True, 4).eval()
    x = torch.randn(3, K, dtype=torch.bfloat16)
    torch._dynamo.reset()
    with torch.no_grad(), torch._dynamo.config.patch(enable_aot_compile=True):
        # as vLLM does: the class's forward, the module passed as its first argument
        compiled = torch.compile(type(m).forward, fullgraph=True, backend="zen").aot_compile(((m, x), {}))
        y = compiled(m, x)
    assert zen_inductor.counters["dequant_matmul"] >= 1
    assert "zen.quant_linear" in zen_inductor.last_report()["matches"][0]["replacement"]
    assert sqnr(y, m(x)) >= 40
    with pytest.raises(NotImplementedError, match="not saved"):
        compiled.save_compiled_function(str(tmp_path / "graph"))


@pytest.mark.parametrize("fmt", ["bf16", "int8dq"])
def test_two_modules_of_one_class_each_compute_with_their_own_weights(fmt, caplog):
    """With Inductor's global freezing flag off, Dynamo passes parameters as inputs and reuses one
    graph for every module of a class; zen froze the first module's weights into it, so a second
    model compiled in the process returned the first one's outputs (-3 dB). Each module's weights
    get a graph of their own, compiled once."""
    import logging

    from conftest import quantize
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    def module():
        linear = torch.nn.Linear(512, 256).to(torch.bfloat16).eval()
        return quantize(linear, Int8DynamicActivationInt8WeightConfig()) if fmt == "int8dq" else linear

    first, second = module(), module()
    x = torch.randn(2, 512, dtype=torch.bfloat16)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="zen_inductor"):
        for m in (first, second, first, second, second):
            assert sqnr(compile_zen(m)(x), m(x).float()) >= 30
            assert len(zen_inductor.last_report()["matches"]) == 1  # the second one's graph is zen's too
    assert sum("compiling it for these weights" in r.message for r in caplog.records) == 1
