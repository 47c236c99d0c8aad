"""The tuner's persistent memory: winners per (machine, versions, kernel sources, linear, shape bin)
in one JSON file, shared safely between processes, so a second process tunes nothing."""
from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import tempfile
from typing import Optional

import torch

from . import config, cpu, native
from .kernels import KERNELS, LinearSpec
from .bins import ShapeBin

log = logging.getLogger("zen_inductor")

# 6: rankings timed while a C++ build ran beside them (before native.settle) are not kept
# 7: nor those from a single sample a contender (second_samples)
CACHE_VERSION = 7


def machine_key() -> str:
    flags = sorted(f for f in cpu.flags() if f.startswith(("avx", "amx", "fma", "f16c")))
    parts = [_installed(), ",".join(flags), f"threads={torch.get_num_threads()}",
             f"use_zentorch={config.use_zentorch}", f"native={native.source_digest()}"]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


@functools.lru_cache(None)
def _installed() -> str:
    """The processor and the versions installed: fixed for a process, and asked for every linear
    and bin (1,700 times a SmolLM2 compile; the package metadata lookup cost ~1 ms each)."""
    try:
        import torchao

        torchao_version = torchao.__version__
    except Exception:
        torchao_version = "none"
    return "|".join([platform.processor() or platform.machine(), _cpu_model(), f"torch={torch.__version__}",
                     f"zentorch={cpu.zentorch_version()}", f"torchao={torchao_version}",
                     f"zen={importlib.metadata.version('zen_inductor')}"])


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
        """The file's entries (do not modify: the parse is shared until the file changes)."""
        try:
            st = os.stat(self.path)
            return _parsed(self.path, st.st_ino, st.st_mtime_ns, st.st_size)
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
                entries = {**self._read(), **updates}
                fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".autotune-", suffix=".json")
                with os.fdopen(fd, "w") as f:
                    json.dump({"version": CACHE_VERSION, "entries": entries}, f, indent=1, sort_keys=True)
                os.replace(tmp, self.path)
        except OSError as e:
            log.warning("zen: could not write autotune cache %s (%s)", self.path, e)


@functools.lru_cache(4)
def _parsed(path: str, inode: int, mtime_ns: int, size: int) -> dict:
    """One parse of the file a version of it (writers replace it, so a new one has a new inode):
    a compile asks for every linear and bin, 1,700 reads of the whole file for SmolLM2."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
        raise ValueError("unknown format")
    return data["entries"]


def cache_key(spec: LinearSpec, bin: ShapeBin, usable: list[str]) -> str:
    return "|".join([machine_key(), spec.kind, f"n={spec.n}", f"k={spec.k}", f"bin={bin.label}", ",".join(sorted(usable))])

