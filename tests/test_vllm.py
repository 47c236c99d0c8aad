"""Zen as vLLM's compile backend on the real model (SmolLM2-135M-Instruct), in bf16 and in the two
torchao formats vLLM quantizes it into at load (int8 W8A8, int4 weight-only g32).

Opt-in (marker ``vllm``; each engine takes about two minutes to start on 2 cores): in the venv
that ``scripts/vllm-venv`` makes, ``python -m pytest -m vllm tests/test_vllm.py``. ``.ci/run`` runs it.

Each engine runs in a process of its own (``vllm_engine.py``): greedy continuations with the raw
logits of every step, and the raw logits of a fixed text read whole. Zen against vLLM's default
backend on the same weights: the text's logits within the SQNR bar, and every greedy continuation
equal up to the first near tie (two logits a bf16 step or two apart, vLLM's logits being bf16),
which is reported.
"""
import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.vllm

HERE = os.path.dirname(__file__)
LINEARS = 30 * 4  # SmolLM2's 30 layers: q/k/v and gate/up come merged by vLLM, then o and down
BARS = {"bf16": 40.0, "int8dq": 30.0, "int4wo": 40.0}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        pytest.fail("vLLM is not installed here: run these tests in the venv scripts/vllm-venv makes")
    runs = {}

    def run(backend: str, fmt: str) -> dict:
        if (backend, fmt) not in runs:
            folder = tmp_path_factory.mktemp(f"{backend}-{fmt}")
            out, dumps = folder / "result.json", folder / "dumps"
            env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "ZEN_INDUCTOR_DEBUG_DIR": str(dumps)}
            done = subprocess.run([sys.executable, os.path.join(HERE, "vllm_engine.py"), backend, fmt, str(out)],
                                  env=env, capture_output=True, text=True, timeout=1200)
            assert done.returncode == 0, done.stderr[-4000:]
            runs[backend, fmt] = {**json.loads(out.read_text()), "reports": _reports(dumps)}
        return runs[backend, fmt]

    return run


def _reports(dumps) -> list[dict]:
    if not dumps.exists():
        return []
    return [json.loads((d / "report.json").read_text()) for d in sorted(dumps.iterdir()) if (d / "report.json").exists()]


def _bf16_step(x: float) -> float:
    return 2.0 ** (math.floor(math.log2(abs(x))) - 7) if x else 0.0


def _sqnr(ref: list[float], y: list[float]) -> float:
    noise = sum((a - b) ** 2 for a, b in zip(ref, y))
    return math.inf if noise == 0 else 10 * math.log10(sum(a * a for a in ref) / noise)


@pytest.mark.parametrize("fmt", ["bf16", "int8dq", "int4wo"])
def test_zen_in_vllm_matches_the_default_backend(engine, fmt):
    default, zen = engine("default", fmt), engine("zen", fmt)

    tokens = default["scored"]["tokens"]
    pairs = [(d[str(t)], z[str(t)]) for t, d, z in zip(tokens, default["scored"]["positions"], zen["scored"]["positions"]) if d]
    assert len(pairs) == len(tokens) - 1
    text_sqnr = _sqnr([d for d, _ in pairs], [z for _, z in pairs])
    print(f"{fmt}: the fixed text's logits, zen against the default backend: {text_sqnr:.1f} dB")
    assert text_sqnr >= BARS[fmt]

    for d, z in zip(default["greedy"], zen["greedy"]):
        first = next((i for i, (a, b) in enumerate(zip(d["tokens"], z["tokens"])) if a != b), None)
        if first is None:
            assert d["tokens"] == z["tokens"]
            continue
        step = d["steps"][first]
        best, zens_choice = max(step.values()), step.get(str(z["tokens"][first]))
        print(f"{fmt}: near tie at new token {first}: default {d['text']!r}, zen {z['text']!r} "
              f"(the default's logits there: {best} for its token, {zens_choice} for zen's)")
        assert zens_choice is not None and best - zens_choice <= 2 * _bf16_step(best)


@pytest.mark.parametrize("fmt", ["bf16", "int8dq", "int4wo"])
def test_zen_dumps_say_what_it_did_inside_vllm(engine, fmt):
    from vllm.platforms import current_platform

    (report,) = engine("zen", fmt)["reports"]  # vLLM compiles its model as one graph on CPU
    replaced = [m for m in report["matches"] if m["replacement"].startswith("zen.quant_linear")]
    left = [n for n in report["near_misses"] if n["reason"].startswith("left to ")]
    if fmt != "bf16":
        assert len(replaced) == LINEARS and {m["pattern"] for m in replaced} == {"dequant_matmul"}
        assert all("quantization/torchao.py" in m["source"] for m in replaced)  # vLLM's torchao linear method
    elif current_platform.is_zen_cpu():  # vLLM's zentorch linears on weights zentorch prepacked: left to them
        assert not replaced and len(left) == LINEARS
        assert all("zentorch.zentorch_linear_unary on a weight it prepacked" in n["reason"] for n in left)
    else:
        assert len(replaced) == LINEARS and {m["pattern"] for m in replaced} == {"dense_matmul"}
    assert report["frozen"] is True
