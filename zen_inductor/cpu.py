"""What this CPU can run: the one place zen_inductor reads the CPU's features.

The features come from ``/proc/cpuinfo``, narrowed by ``config.cpu_capability`` when it is set
(named as PyTorch's ``ATEN_CPU_CAPABILITY``): ``avx2`` hides AVX-512, AMX and AVX-VNNI, so zen
chooses, builds and tests as on an AVX2-only EPYC; ``default`` hides the vector extensions
altogether. A testing aid: ``ZEN_INDUCTOR_CPU_CAPABILITY=avx2 python -m pytest -q`` runs the
suite as an AVX2 machine on an AVX-512 one. ATen and Inductor's own code keep the real CPU:
ATEN_CPU_CAPABILITY=avx2 on an AVX512-BF16 machine made ATen's bf16 flash attention fail
("pack_vnni2 is only supported when avx512 is supported") and, with zentorch imported, let
Inductor reuse cached graphs that then returned NaN.
"""
from __future__ import annotations

import functools
from typing import Iterable, Optional

from . import config

# what config.cpu_capability takes away from the CPU's own flags, by prefix
_HIDDEN_BY_CAPABILITY = {
    "avx512": (),
    "avx2": ("avx512", "amx", "avx_vnni"),
    "default": ("avx", "amx", "fma", "f16c"),
}

_ZENTORCH_ISA = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni")


@functools.lru_cache(None)
def _cpuinfo_flags() -> frozenset:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def hardware_flags() -> frozenset:
    """The CPU's own feature flags, whatever config.cpu_capability hides: what Inductor's code runs on."""
    return _cpuinfo_flags()


def flags() -> frozenset:
    """The CPU's feature flags as /proc/cpuinfo names them, less what config.cpu_capability hides."""
    hidden = _HIDDEN_BY_CAPABILITY.get(config.cpu_capability.strip().lower(), ())
    return frozenset(f for f in _cpuinfo_flags() if not f.startswith(hidden)) if hidden else _cpuinfo_flags()


def missing(required: Iterable[str]) -> Optional[str]:
    """``"CPU lacks a, b"`` for the ``required`` flags this CPU does not have, or None."""
    have = flags()
    lacking = [f for f in required if f not in have]
    return f"CPU lacks {', '.join(lacking)}" if lacking else None


def describe() -> str:
    """The CPU's name and the vector extensions that decide zen's kernels, for benchmark results:
    "AVX-512" alone named both an AMX Xeon and an Ice Lake one, whose kernels differ."""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")
    except OSError:
        name = "unknown CPU"
    have = hardware_flags()
    if "avx512f" not in have:
        return f"{name} ({'AVX2' if 'avx2' in have else 'no AVX2'})"
    extras = {"avx512_vnni": "VNNI", "avx512_bf16": "BF16", "amx_bf16": "AMX"}
    return f"{name} (AVX-512 {', '.join(v for k, v in extras.items() if k in have) or 'F'}; " \
           f"without {', '.join(v for k, v in extras.items() if k not in have) or 'nothing of these'})"


def native_bf16_gemm() -> bool:
    """Whether a bf16 GEMM runs in hardware (AVX512-BF16 or AMX) rather than through fp32."""
    return bool({"avx512_bf16", "amx_bf16"} & flags())


def amx_bf16() -> bool:
    """Whether the CPU has AMX tiles for bf16, which ATen's oneDNN GEMM uses and zentorch's does not."""
    return "amx_bf16" in flags()


@functools.lru_cache(None)
def _zentorch_import_error() -> Optional[str]:
    """zen's one import of zentorch. Its import writes into Inductor's config
    (``aot_inductor.custom_ops_to_c_shims``, ``_cache_config_ignore_prefix``): what it changed is
    put back, so a later compile by another backend in this process runs under the config it
    would have had (zen calls zentorch's ops from Inductor's Python wrapper, which reads neither)."""
    import torch._dynamo.config
    import torch._inductor.config

    configs = (torch._inductor.config, torch._dynamo.config)
    before = [c.get_config_copy() for c in configs]
    try:
        import zentorch  # noqa: F401
    except Exception as e:  # any import failure means: not available
        return f"zentorch does not import ({type(e).__name__}: {e})"
    finally:
        for c, old in zip(configs, before):
            changed = {key: value for key, value in old.items() if c.get_config_copy().get(key) != value}
            if changed:
                c.load_config(changed)
    return None


def zentorch_version() -> str:
    """zentorch's version where it imports (through zen's one import of it), else "none"."""
    import sys

    return sys.modules["zentorch"].__version__ if _zentorch_import_error() is None else "none"


def zentorch_unavailable() -> Optional[str]:
    """Why zentorch ops must not be used here, or None.

    Without AVX512-BF16 zentorch's WOQ kernels return NaN or garbage with no error (measured on
    an AVX2-only EPYC VM), so the ISA is checked before any call.
    """
    if not config.use_zentorch:
        return "zentorch disabled by config.use_zentorch=False"
    lacking = missing(_ZENTORCH_ISA)
    if lacking:
        return f"{lacking} that zentorch kernels need"
    return _zentorch_import_error()
