"""Our own C++ kernels, compiled on first use with Inductor's C++ toolchain and cache.

Inductor already knows how to build C++ for this CPU (vector-ISA flags, OpenMP as torch uses
it, a cache keyed by source and flags): the kernels here go through the same path as the
kernels Inductor generates, so they need nothing at install time. A kernel that cannot be
built is unavailable, with the reason, and the autotuner uses the other candidates.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
import os
import re
from importlib import resources
from typing import Callable, Optional

import torch

from . import cpu

log = logging.getLogger("zen_inductor")

# what csrc/avx512_common.h targets (ZEN_AVX512), and with bf16 products (ZEN_AVX512_BF16): Ice Lake
# Xeons have the first without the second
_AVX512 = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")
_AVX512_BF16 = (*_AVX512, "avx512_bf16")
# csrc/decode_attention.h's entry: q, k, v, mask, out, scale, then B, H, Hkv, L, D, 9 strides, has_mask, kv_kind,
# k_scale, v_scale
_DECODE_ATTENTION_ARGS = ("const float*", "const void*", "const void*", "const float*", "float*", "const float*",
                          *("int64_t",) * 16, "const float*", "const float*")

# the entries on GGUF's Q8_0 blocks (q8_0_rows.cpp, q8_0_gemm.cpp): x, blocks, bias, y, M, N, K,
# x_bf16, y_bf16, has_bias, bits, swiglu, residual, has_residual
_Q8_0_ARGS = ("const void*", "const uint8_t*", "const float*", "void*", *("int64_t",) * 8, "const float*", "int64_t")

# the entry on the model's own int8 rows (a8w8_rows.h): x, tiles, scale, w0, w1, w2, bias, y, M, N, K, x_bf16,
# y_bf16, has_bias, swiglu, residual, has_residual
_A8W8_ROWS_ARGS = ("const void*", "const int64_t*", "const float*", *("const int8_t*",) * 3, "const float*", "void*",
                   *("int64_t",) * 7, "const float*", "int64_t")

# the entries of csrc/woq_avx512.h: x, w, scale, offset, bias, y, M, N, K, G, x_bf16, y_bf16, has_bias, bits,
# grouped, swiglu, residual, has_residual
_WOQ_AVX512_ARGS = ("const void*", "const uint8_t*", "const float*", "const float*", "const float*", "void*",
                    *("int64_t",) * 10, "const float*", "int64_t")

# name -> (source file in zen_inductor/csrc, argument types of its ``kernel`` entry, CPU flags)
# An entry the C++ ops call (csrc/ops.cpp) is bound by address; its types here say how many
# words the op passes it (a linear entry's list follows the one convention of quant_linear.native).
SOURCES = {
    "a8w4_avx2": (
        "a8w4_avx2.cpp",
        ("const void*", "const uint8_t*", "const float*", "const float*", "const int32_t*", "const float*", "void*",
         "int64_t", "int64_t", "int64_t", "int64_t", "int64_t", "int64_t", "int64_t", "int64_t", "const float*", "int64_t"),
        ("avx2", "fma"),
    ),
    "woq_avx2": (
        "woq_avx2.cpp",
        ("const void*", "const uint8_t*", "const float*", "const float*", "const float*", "void*",
         "int64_t", "int64_t", "int64_t", "int64_t", "int64_t", "int64_t", "int64_t", "int64_t", "int64_t", "const float*", "int64_t"),
        ("avx2", "fma"),
    ),
    "bf16_gemv_avx2": (
        "bf16_gemv_avx2.cpp",
        ("const void*", "const uint16_t*", "const float*", "void*", "int64_t", "int64_t", "int64_t", "int64_t",
         "int64_t", "int64_t", "int64_t", "int64_t", "const float*", "int64_t"),
        ("avx2", "fma"),
    ),
    "bf16_gemv_avx512": (
        "bf16_gemv_avx512.cpp",
        ("const void*", "const uint16_t*", "const float*", "void*", "int64_t", "int64_t", "int64_t", "int64_t",
         "int64_t", "int64_t", "int64_t", "int64_t", "const float*", "int64_t"),
        _AVX512_BF16,
    ),
    "woq_avx512": ("woq_avx512.cpp", _WOQ_AVX512_ARGS, _AVX512),
    "woq_a8_avx512": ("woq_a8_avx512.cpp", _WOQ_AVX512_ARGS, _AVX512),  # the same entry on x in int8 per group
    "a8w8_rows_avx2": ("a8w8_rows_avx2.cpp", _A8W8_ROWS_ARGS, ("avx2", "fma")),
    "a8w8_rows_avx512": ("a8w8_rows_avx512.cpp", _A8W8_ROWS_ARGS, _AVX512),  # the same entry with vpdpbusd
    "q8_0_rows": ("q8_0_rows.cpp", _Q8_0_ARGS, ("avx2", "fma", "f16c")),
    "q8_0_gemm": ("q8_0_gemm.cpp", _Q8_0_ARGS, ("avx2", "fma", "f16c")),  # the same layout, for many rows of x
    "swiglu_avx2": (
        "swiglu_avx2.cpp",
        ("const void*", "void*", "int64_t", "int64_t", "int64_t", "int64_t"),
        ("avx2", "fma"),
    ),
    "decode_attention": (
        "decode_attention.cpp",
        _DECODE_ATTENTION_ARGS,
        ("avx2", "fma"),
    ),
    "decode_attention_avx512": (  # the same entry with 16 lanes: zen::decode_attention prefers it where bound
        "decode_attention_avx512.cpp",
        _DECODE_ATTENTION_ARGS,
        _AVX512,
    ),
    "prefill_attention_avx2": (  # q, k, v, mask, out, extents, B, H, Hkv, L, S, D, 12 strides, has_mask, causal,
        "prefill_attention_avx2.cpp",  # bf16, mask_bf16, scale
        (*("const void*",) * 4, "void*", "const int64_t*", *("int64_t",) * 22, "const float*"),
        ("avx2", "fma"),
    ),
    "int8_gemm_avx2": (  # x, w, sums, M, N, K, threads: zen_a8w8_gemm_avx2's exact int32 sums
        "int8_gemm_avx2.cpp",
        ("const int8_t*", "const int8_t*", "int32_t*", *("int64_t",) * 4),
        ("avx2", "fma"),
    ),
    "int8_quantize_rows": (  # x, codes, scales, M, K, x_bf16: aten_int_mm_da8's int8 x
        "int8_quantize_rows.cpp",
        ("const void*", "int8_t*", "float*", "int64_t", "int64_t", "int64_t"),
        ("avx2", "fma"),
    ),
    "int8_rows_epilogue": (  # aten_int_mm_da8's int32 sums to its output (scales, bias, swiglu) in one pass
        "int8_rows_epilogue.cpp",
        ("const int32_t*", "const int32_t*", *("const float*",) * 5, "void*", *("int64_t",) * 7),
        ("avx2", "fma"),
    ),
    "tiles_dequant": (
        "tiles_dequant.cpp",
        ("const uint8_t*", "const float*", "const float*", "float*", "int64_t", "int64_t", "int64_t", "int64_t"),
        ("avx2", "fma"),
    ),
}

# entries called by the C++ ops (csrc/ops.cpp), loaded without Python bindings; the others are
# called from Python through Inductor's bindings of their argument types
BOUND_ENTRIES = frozenset({"a8w4_avx2", "a8w8_rows_avx2", "a8w8_rows_avx512", "woq_avx2", "q8_0_rows", "q8_0_gemm",
                           "bf16_gemv_avx2", "bf16_gemv_avx512", "woq_avx512", "woq_a8_avx512", "decode_attention",
                           "decode_attention_avx512"})


@functools.lru_cache(None)
def _build(name: str) -> tuple[Optional[Callable], Optional[str]]:
    return _started(name)()


@functools.lru_cache(None)
def source_digest() -> str:
    """A hash of every kernel's source as compiled: tuning results measured with other code are stale."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(SOURCES):
        digest.update(_source(SOURCES[name][0]).encode())
    return digest.hexdigest()[:16]


def start(name: str) -> None:
    """Start building ``name`` in the background, two builds at a time (``candidates`` starts
    every library a linear needs before it waits for any).

    On a machine whose cache does not hold them yet the builds took ~2 s each. All four were
    started at the top of every compile before: on two cores the builds a model did not need
    (the int4 and int8 ones for a bf16 model) ran beside Inductor's own work. With the cache
    warm a start only finds its library.
    """
    from . import config

    if config.native_kernels and not missing_isa(name):
        _started(name)


def _started(name: str) -> Callable[[], tuple[Optional[Callable], Optional[str]]]:
    """Submit the build of ``name`` once; the returned callable waits for it: (kernel, None) or (None, reason)."""
    if name not in _BUILDS:
        _BUILDS[name] = _submit(name)
    return _BUILDS[name]


# name -> waiter of its build: a memo of work done in this process, as functools' caches are
_BUILDS: dict = {}


def settle() -> None:
    """Wait for every build started so far. The tuner times kernels only after this: a compiler
    process beside a timed kernel (two cores) made candidates up to 2x slower, unevenly, enough
    to rank zentorch's int4 GEMM ahead of the bf16 copy's at prefill (46 against 19 ms a call
    undisturbed), which took the int4 llama1b prefill from 164 to 293 ms."""
    _toolchain_checked()
    for wait in list(_BUILDS.values()):
        wait()


def check_toolchain() -> None:
    """Start Inductor's check of the vector ISAs this CPU and compiler can build, in the background.

    The first C++ build of a process waits for it, on the thread that builds: with an empty cache
    it compiled and loaded six probe libraries here, 8-10 s of every cold compile, ours (our first
    kernel build) or stock Inductor's (its first generated kernel). Started when zen is called, it
    runs on the second core while AOTAutograd traces the graph on one (~2.5 s of a llama1b-4l
    prefill graph); our builds and Inductor's code generation then wait for what is left of it.
    (Our pass reading weights beside it gained nothing: torch's ops there use both cores.)

    With native kernels on, the C++ ops' build starts too: any compile that runs a kernel of ours
    loads that library (our linears are bound into it, Inductor's wrapper calls through it), and
    its build against torch's headers is the longest of ours (~12 s here). Started on the first
    linear, a cold 1B int4 compile waited 12 s for it; from here it runs beside the ISA check (it
    picks no vector ISA) while the model is traced: ready ~14 s after zen's entry on a machine's
    first compile, ~19 s when it followed the check.
    """
    from . import config

    _toolchain()
    if config.native_kernels:
        _op_library()


@functools.lru_cache(None)
def _toolchain():
    from concurrent.futures import ThreadPoolExecutor

    from torch._inductor.cpu_vec_isa import pick_vec_isa

    # a thread of its own: every build waits for this check, so on the builders' pool it could
    # queue behind two builds that wait for it (linears.py, which starts builds without zen's
    # entry, hung there)
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="zen-isa-check").submit(pick_vec_isa)


def _toolchain_checked() -> None:
    try:
        _toolchain().result()
    except Exception as e:  # whoever builds next runs the check again and meets the error itself
        log.info("zen_inductor: the vector ISA check failed in the background: %s", e)


def _submit(name: str) -> Callable[[], tuple[Optional[Callable], Optional[str]]]:
    filename, argtypes, flags = SOURCES[name]
    lacking = cpu.missing(flags)
    if lacking:
        return lambda: (None, lacking)
    if name in BOUND_ENTRIES:
        return _submit_bound_entry(name)
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    return _waiter(filename, _builders().submit(_build_with_toolchain, CppPythonBindingsCodeCache.load_pybinding_async,
                                                argtypes, _source(filename)))


def _submit_bound_entry(name: str) -> Callable[[], tuple[Optional[Callable], Optional[str]]]:
    """Build the entry as a plain library and bind its address in the C++ ops' table."""
    filename = SOURCES[name][0]
    return _bound(name, _waiter(filename, _builders().submit(_build_with_toolchain, _code_caches()[0].load_async,
                                                             _source(filename))))


def _bound(name: str, library: Callable) -> Callable[[], tuple[Optional[Callable], Optional[str]]]:
    """``library``'s entry bound in the C++ ops' table. The binding waits on the caller's thread:
    a builder waiting for the op's library could wait for a build queued behind itself."""
    op_library = _op_library()

    def wait():
        loaded, reason = library()
        if loaded is None:
            return None, reason
        op, reason = op_library()
        if op is None:
            return None, reason
        address = ctypes.cast(loaded.kernel, ctypes.c_void_p).value
        op.zen_bind_native(name.encode(), ctypes.c_void_p(address), ctypes.c_int64(len(SOURCES[name][1])))
        return loaded, None

    return functools.lru_cache(None)(wait)


def library_file(name: str) -> Optional[str]:
    """The file of the library ``name`` (an entry of SOURCES or ``OP_LIBRARY``) as this process
    loaded it, or None where it has not: what an ahead-of-time package carries."""
    if name not in _BUILDS:
        return None
    loaded, _ = _BUILDS[name]()
    # a plain library (ctypes), or the Python binding's function, whose module is the file
    return getattr(loaded, "_name", None) or getattr(getattr(loaded, "__self__", None), "__file__", None)


def use_built(files: dict) -> None:
    """Load the libraries ``files`` names (name -> file, as ``library_file`` gave them) instead
    of building them: an ahead-of-time package's, in a process that imports neither Inductor nor
    a compiler. A library this process has already started stays the one it uses."""
    for name in sorted(files, key=lambda n: n != OP_LIBRARY):  # entries bind into the op library
        if name in _BUILDS:
            continue
        plain = name == OP_LIBRARY or name in BOUND_ENTRIES
        loaded = functools.lru_cache(None)(functools.partial(_load_file, files[name], None if plain else name))
        _BUILDS[name] = _bound(name, loaded) if name in BOUND_ENTRIES else loaded


def _load_file(path: str, binding: Optional[str]) -> tuple[Optional[Callable], Optional[str]]:
    """A plain library, or (``binding``: the entry's name) the ``kernel`` function of the Python
    module Inductor's bindings build, loaded as Inductor loads it."""
    try:
        if binding is None:
            return ctypes.CDLL(path), None
        # the binding's module reads this at import, as when Inductor loads it
        os.environ["_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR"] = str(
            torch._C._dynamo.guards._torchinductor_pyobject_tensor_data_ptr)
        spec = importlib.util.spec_from_file_location(f"zen_inductor_native_{binding}.kernel", path)  # PyInit_kernel
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.kernel, None
    except (OSError, ImportError, AttributeError) as e:
        return None, f"could not load {path} ({e})"


def _op_library() -> Callable[[], tuple[Optional[Callable], Optional[str]]]:
    """The C++ ops' implementations (csrc/ops.cpp), built against torch's headers once (~30 s on
    two cores; Inductor's cache keeps it) and loaded, which registers them."""
    if OP_LIBRARY not in _BUILDS:
        _BUILDS[OP_LIBRARY] = _waiter("ops.cpp", _builders().submit(
            _build_with_toolchain, _code_caches()[1].load_async, _source("ops.cpp"), needs_vec_isa=False))
    return _BUILDS[OP_LIBRARY]


OP_LIBRARY = "ops"  # its key among the builds


def op_library_unavailable() -> Optional[str]:
    """Why the C++ ops (csrc/ops.cpp) cannot be loaded here, or None; built and loaded on the first ask."""
    return _op_library()()[1]


@functools.lru_cache(None)
def fast_calls():
    """The C++ ops as CPython functions (``zen_fast_calls`` in csrc/ops.cpp): a module object
    with ``linear`` and ``decode_attention``, or None where the op library cannot load."""
    import ctypes

    library, _ = _op_library()()
    if library is None:
        return None
    make = ctypes.PyDLL(library._name).zen_fast_calls  # the loaded library again, called with the GIL held
    make.restype = ctypes.py_object
    return make()


def _build_with_toolchain(load_async, *args, **kwargs):
    # a build that picks the vector ISA waits for the check (a second one beside it would repeat its
    # probes); the C++ ops use none, and their build (the longest of ours) runs beside the check:
    # on a machine's first compile they were ready ~5 s sooner
    if kwargs.get("needs_vec_isa", True):
        _toolchain_checked()
    return load_async(*args, **kwargs)()


def _waiter(filename: str, future) -> Callable[[], tuple[Optional[Callable], Optional[str]]]:
    @functools.lru_cache(None)  # one answer, and one warning, a build: every waiter asks again
    def wait():
        try:
            return future.result(), None
        except Exception as e:  # a compiler error, no compiler, a read-only cache: not available
            reason = f"could not build {filename} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            log.warning("zen_inductor: %s; its kernels are skipped", reason)
            return None, reason

    return wait


@functools.lru_cache(None)
def _builders():
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=2, thread_name_prefix="zen-build")  # each runs a compiler process


@functools.lru_cache(None)
def _code_caches():
    from torch._inductor.codecache import CppCodeCache

    class PlainLibraries(CppCodeCache):
        cache: dict = {}
        cpp_compile_command_flags = {"include_pytorch": False, "shared": True}

    class TorchLibraries(CppCodeCache):
        cache: dict = {}
        cpp_compile_command_flags = {"include_pytorch": True, "shared": True}

    return PlainLibraries, TorchLibraries


def _source(filename: str) -> str:
    # one source string per kernel (Inductor's cache compiles text, not files): each of our
    # headers goes in place of its first #include (they are #pragma once)
    csrc = resources.files("zen_inductor").joinpath("csrc")
    text, seen = csrc.joinpath(filename).read_text(), set()

    def inline(match):
        header = match.group(1)
        if header in seen:
            return ""
        seen.add(header)
        return _LOCAL_INCLUDE.sub(inline, csrc.joinpath(header).read_text())

    return _LOCAL_INCLUDE.sub(inline, text)


_LOCAL_INCLUDE = re.compile(r'^#include "(\w+\.h)"$', re.M)


def load(name: str) -> Callable:
    fn, reason = _build(name)
    if fn is None:
        raise RuntimeError(reason)
    return fn


def missing_isa(name: str) -> Optional[str]:
    """Why this CPU cannot run the library ``name`` (the vector extensions it lacks), or None:
    known without building it, so a compile never builds or starts one it cannot use."""
    return cpu.missing(SOURCES[name][2])


def unavailable(name: str) -> Optional[str]:
    """Why the native kernel ``name`` cannot run here, or None."""
    from . import config

    if not config.native_kernels:
        return "native kernels disabled by config.native_kernels=False"
    return missing_isa(name) or _build(name)[1]
