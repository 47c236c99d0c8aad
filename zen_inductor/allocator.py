"""How a compile uses glibc's allocator: big temporaries reuse freed memory, and it is handed back.

A compile makes and drops hundreds of full-size copies of the weights (reading dequant chains,
freezing, packing, references for verification). glibc serves every block over 32 MB with a
fresh ``mmap`` and unmaps it on free, so each such tensor is paid again in page faults: on this
VM about 2 GB/s, three times slower than the arithmetic on it (an fp32 chain of three ops on a
8192 x 2048 weight: 76 ms fresh, 22 ms on reused memory). During a compile the blocks come from
the heap instead, where freed memory is reused; afterwards the allocator gets settings that
match its own dynamic defaults, and the freed heap goes back to the OS.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import mmap
from typing import Optional

import torch

from . import config

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
# where glibc's dynamic thresholds settle once a big block was freed (64-bit): the values it
# would have had, since setting any parameter switches the dynamic adjustment off
_SETTLED_MMAP_THRESHOLD = 32 << 20
_SETTLED_TRIM_THRESHOLD = 2 * _SETTLED_MMAP_THRESHOLD
_DEFAULT_MMAP_MAX = 65536


@functools.lru_cache(None)
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc: its allocator's policy is its own
        return None


@contextlib.contextmanager
def reuse_freed_memory():
    libc = _libc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_MMAP_THRESHOLD, _SETTLED_MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, _SETTLED_TRIM_THRESHOLD)
        # the heap the compile freed (weight copies, fp32 references) goes back to the OS: glibc
        # would keep it for reuse, and a compiled demo model kept ~300 MB no tensor used
        libc.malloc_trim(0)


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS now (during a compile they are kept for reuse)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _meminfo_kb() -> dict:
    try:
        with open("/proc/meminfo") as f:
            return {line.split(":")[0]: int(line.split()[1]) for line in f if line.split()[-1] == "kB"}
    except (OSError, ValueError, IndexError):
        return {}


def memory_short_of(nbytes: int, reserve: Optional[float] = None) -> Optional[str]:
    """Why ``nbytes`` more resident memory would leave less available than ``reserve`` (by default
    ``config.memory_reserve``) of the machine's, or None (also where /proc/meminfo cannot tell)."""
    reserve = config.memory_reserve if reserve is None else reserve
    info = _meminfo_kb()
    if "MemAvailable" not in info or "MemTotal" not in info:
        return None
    available, total = info["MemAvailable"] << 10, info["MemTotal"] << 10
    left = available - nbytes
    if left >= reserve * total:
        return None
    return (f"{nbytes / 2**20:.0f} MB more would leave {max(left, 0) / 2**30:.1f} of {total / 2**30:.1f} GB available, "
            f"under config.memory_reserve ({reserve:.0%})")


# Packed weights are read once per token; with 4 KB pages a 1B model's decode walks ~150k page
# translations (nested, under a VM) per token. On 2 MB pages the same GEMVs ran 7% faster here
# (17 llama1b decode linears, zentorch's bf16 GEMM: 22.3 against 20.6 ms, 10 alternating rounds),
# and a compiled bf16 llama1b-4l decoded at 14.9 against 16.2 ms a token. Under THP "madvise"
# only memory that asked for it gets huge pages, and only when it is first touched: the compile's
# heap is reused memory already faulted in, so the copy gets a private mapping of its own.
HUGE_PAGE = 2 << 20


@functools.lru_cache(None)
def _transparent_huge_pages() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        return "never"


def empty_on_huge_pages(shape, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """An uninitialized tensor on memory that asked for transparent huge pages, or None where
    that cannot help (small, THP off, config.huge_page_weights=False)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if (
        not config.huge_page_weights
        or nbytes < 2 * HUGE_PAGE
        or _transparent_huge_pages() not in ("always", "madvise")
        or not hasattr(mmap, "MADV_HUGEPAGE")
    ):
        return None
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE)  # shared memory has its own THP policy
    raw = torch.frombuffer(region, dtype=torch.uint8)  # keeps the mapping alive
    start = (-raw.data_ptr()) % HUGE_PAGE
    try:
        region.madvise(mmap.MADV_HUGEPAGE, start, nbytes // HUGE_PAGE * HUGE_PAGE)
    except OSError:
        return None
    return raw[start : start + nbytes].view(dtype).view(shape)


def empty_for_packing(shape, dtype: torch.dtype) -> torch.Tensor:
    """Where a decode kernel packs its copy of a weight: straight onto huge pages, so that
    ``on_huge_pages`` finds it there (copying a bf16 llama1b-4l's 617 MB of packings over took
    1 s of a cold compile)."""
    out = empty_on_huge_pages(shape, dtype)
    return out if out is not None else torch.empty(shape, dtype=dtype)


# madvise(2) advice Python's mmap module does not name for memory it did not map
_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25


def collapse_to_huge_pages(t: torch.Tensor) -> bool:
    """Put the model's own tensor ``t`` on huge pages where it lies, without a copy of it:
    MADV_COLLAPSE (Linux 6.1) moves each whole 2 MB of its bytes onto a huge page in place,
    one page at a time. Under THP "madvise" the model's tensors sit on 4 KB pages, where kernels
    reading them as they are (the int8 own rows, the dense bf16 GEMVs) lost 10-20% of a decode
    GEMV to packings on huge pages. False where nothing was done (small, THP off, an older
    kernel, config.huge_page_weights=False); the bytes and their addresses never change."""
    nbytes = t.untyped_storage().nbytes()
    libc = _libc()
    if (libc is None or t.device.type != "cpu" or not config.huge_page_weights or nbytes < 2 * HUGE_PAGE
            or _transparent_huge_pages() not in ("always", "madvise")):
        return False
    start = -(-t.untyped_storage().data_ptr() // HUGE_PAGE) * HUGE_PAGE
    end = (t.untyped_storage().data_ptr() + nbytes) // HUGE_PAGE * HUGE_PAGE
    if end <= start:
        return False
    madvise = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)(("madvise", libc))
    # the first marks the range (khugepaged may also collapse it later), the second collapses it now
    return madvise(start, end - start, _MADV_HUGEPAGE) == 0 and madvise(start, end - start, _MADV_COLLAPSE) == 0


def _placed(t: torch.Tensor) -> bool:
    # what empty_on_huge_pages hands out: 2 MB-aligned data inside a mapping one huge page larger
    nbytes = t.numel() * t.element_size()
    return t.data_ptr() % HUGE_PAGE == 0 and t.untyped_storage().nbytes() == nbytes + HUGE_PAGE


def on_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """``t`` copied to memory on transparent huge pages, or ``t`` itself where it is there
    already or where that cannot help."""
    if t.device.type != "cpu" or not t.is_contiguous() or _placed(t):
        return t
    out = empty_on_huge_pages(t.shape, t.dtype)
    if out is None:
        return t
    out.copy_(t)
    return out
