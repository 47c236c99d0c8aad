"""zen_inductor: a torch.compile backend for quantized LLM inference on x86 CPUs.

    torch.compile(model, backend="zen")   # registered by entry point; no import needed

``config`` holds the flags, ``counters`` the match counts of this process.
"""
__version__ = "0.1.0"

from . import config  # noqa: E402
from .record import counters  # noqa: E402


def last_report() -> dict:
    """report.json of the most recent compiled graph of this process (also without debug_dir)."""
    from .dumps import recent_records

    records = recent_records()
    if not records:
        raise RuntimeError("nothing compiled with backend='zen' yet")
    return records[-1].report()


def reports() -> list:
    from .dumps import recent_records

    return [r.report() for r in recent_records()]


def load_gguf(path: str, **kwargs):
    """``(model, tokenizer)`` of a GGUF file, its Q4_0/Q4_1/Q8_0 linears kept as the file's blocks
    (see ``zen_inductor.gguf_model.load_gguf``)."""
    from .gguf_model import load_gguf as _load

    return _load(path, **kwargs)


def compile_ahead_of_time(model, max_cache_len: int, **kwargs):
    """A causal LM's prefill and decode compiled by AOTInductor with zen's pass: greedy
    generation with no Dynamo and no Python wrapper a token (see ``zen_inductor.ahead_of_time``)."""
    from .ahead_of_time import compile_ahead_of_time as _compile

    return _compile(model, max_cache_len, **kwargs)


def load_ahead_of_time(package_dir: str):
    """The generator of a folder ``compile_ahead_of_time`` wrote, loaded in this process without
    the model's code or a compile (see ``zen_inductor.aot_package``)."""
    from .aot_package import load_ahead_of_time as _load

    return _load(package_dir)


def __getattr__(name: str):
    if name in ("Int8StaticCache", "Bf16StaticCache"):  # imports transformers: only when asked for
        from . import kv_cache

        return getattr(kv_cache, name)
    raise AttributeError(f"module 'zen_inductor' has no attribute {name!r}")


def zen(gm, example_inputs, **kwargs):
    from .backend import zen as _zen

    return _zen(gm, example_inputs, **kwargs)


__all__ = ["Bf16StaticCache", "Int8StaticCache", "compile_ahead_of_time", "config", "counters", "last_report", "load_ahead_of_time", "load_gguf", "reports", "zen"]
