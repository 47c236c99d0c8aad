import os

# keep the tests' own runs of Inductor and zen apart from the user's caches
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(__file__), ".inductor-cache"))

import pytest
import torch

import zen_inductor
from zen_inductor import config


@pytest.fixture(autouse=True)
def fresh(tmp_path):
    """Every test starts with no compiled code, zero counters and its own autotune cache.

    Dynamo's recompile limit is per process: without a reset, later models silently run eager.
    """
    torch._dynamo.reset()
    zen_inductor.counters.clear()
    with config.patch(cache_dir=str(tmp_path / "zen-cache"), autotune_reps=3):
        yield
    torch._dynamo.reset()


@pytest.fixture
def dumped(tmp_path):
    """Dumps on for this test; ``dumped("after.py")`` is that file of the last compiled graph."""
    import zen_inductor.dumps

    with config.patch(debug_dir=str(tmp_path / "dumps")):
        yield lambda name: open(os.path.join(zen_inductor.dumps.recent_records()[-1].dump_dir, name)).read()


def quantize(model, cfg):
    """torchao's quantize_ without it rewriting Inductor's global settings."""
    from torchao.quantization import quantize_

    if hasattr(cfg, "set_inductor_config"):
        cfg.set_inductor_config = False
    quantize_(model, cfg)
    return model


def sqnr(y, ref) -> float:
    from zen_inductor.verification import sqnr_db

    return sqnr_db(y, ref)


def compile_zen(model, **options):
    return torch.compile(model, backend="zen", options=options or None)


def any_rows(x, dim: int = 0):
    """``x`` with its rows (M) dynamic in the compiled graph: zen tunes every bin of M, where a
    graph at one fixed M tunes only that M's bin."""
    torch._dynamo.mark_dynamic(x, dim)
    return x


def eager_and_zen(model, *inputs):
    """``model(*inputs)`` eager and compiled by zen, under no_grad (so zen freezes the weights)."""
    with torch.no_grad():
        return model(*inputs), compile_zen(model)(*inputs)


def reports_since(before: set) -> list:
    """The reports of the graphs compiled since ``before`` (``compiled_graphs()``): zen keeps the
    last 64, so counting them does not tell new compiles once a session has made that many."""
    return [r for r in zen_inductor.reports() if r["graph"] not in before]


def compiled_graphs() -> set:
    return {r["graph"] for r in zen_inductor.reports()}
