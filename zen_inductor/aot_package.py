"""An ahead-of-time package on disk, and greedy generation through it in any process.

    generator = zen_inductor.load_ahead_of_time("smollm2-aot")   # no model code, no compile
    tokens = generator.generate(input_ids, max_new_tokens=64)

``compile_ahead_of_time`` (``ahead_of_time.py``) writes a folder:

    model.pt2                 an AOTInductor package: the program, for a prompt and for every
                              decode step, and its weights beside it (not in the .so, whose
                              constants loading copied out of its mapping: both resident)
    generator.json            the KV cache (its tensors' names, shapes and dtypes), the cache
                              length, and what the program's calls need: the CPU extensions
                              Inductor built for, our C++ entries, zentorch or not
    native/                   those entries' libraries and our ops' library, as built

The program calls zen's ops (``zen::quant_linear`` and ``zen::prefill_attention``, in the
``.by_rows`` forms that take one row in C++) through the dispatcher, by name: loading imports
their definitions and loads and binds the libraries the package carries. Each weight is held once
(a tied model's token table and output layer with the same bytes are one tensor), handed to the
program as a user-managed constant, and the decode packings go back on huge pages. Loading
imports neither transformers nor the model's code nor Inductor (~70 MB of a process's memory),
and builds nothing: the process that serves holds the program, the cache and zen's kernels.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
import zipfile
from dataclasses import dataclass

import torch

from . import cpu, native
from .allocator import HUGE_PAGE, on_huge_pages

MANIFEST = "generator.json"
PROGRAM = "model.pt2"
_FORMAT = 3


@dataclass
class CompileFigures:
    export_s: float = 0.0
    compile_s: float = 0.0
    load_s: float = 0.0


class AheadOfTimeGenerator:
    """Greedy generation through the program, with its KV cache."""

    def __init__(self, program, cache: dict[str, torch.Tensor], max_cache_len: int, figures: CompileFigures):
        self.program = program
        self.cache = cache  # what the program reads and writes: keep alive while it is loaded
        self.max_cache_len = max_cache_len
        self.figures = figures

    def _run(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        (logits,) = self.program.boxed_run([input_ids, positions])
        return logits

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Logits [1, 1, vocab] of the last of ``input_ids`` [1, S], written to the cache from
        position ``start``: what the next token is chosen from."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must be [1, S] (batch 1), got {list(input_ids.shape)}")
        length = input_ids.shape[1]
        if start + length > self.max_cache_len:
            raise ValueError(f"positions {start}..{start + length - 1} do not fit a cache of {self.max_cache_len}")
        return self._run(input_ids.to(torch.long).contiguous(), torch.arange(start, start + length))

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None,
                 step_times: list | None = None) -> torch.Tensor:
        """Greedy continuation of ``input_ids`` [1, S]: the prompt and the new tokens, [1, S + n].
        ``step_times`` (a list) receives the time from the call to each new token, prefill's first."""
        length = input_ids.shape[1]
        max_new_tokens = min(max_new_tokens, self.max_cache_len - length)
        start = time.perf_counter()
        logits = self.logits(input_ids)
        token = logits[:, -1].argmax(-1, keepdim=True)
        tokens = [token]
        if step_times is not None:
            step_times.append(time.perf_counter() - start)
        position = torch.empty(1, dtype=torch.long)
        for i in range(1, max_new_tokens):
            if eos_token_id is not None and token.item() == eos_token_id:
                break
            start = time.perf_counter()
            position.fill_(length + i - 1)
            logits = self._run(token, position)
            token = logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
            if step_times is not None:
                step_times.append(time.perf_counter() - start)
        return torch.cat([input_ids, *tokens], dim=1)


def write_manifest(package_dir: str, cache: dict[str, torch.Tensor], max_cache_len: int) -> None:
    """What a loading process needs beside the package (see the module's docstring); the
    libraries of zen's the program calls are copied in beside it."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    calls = _zen_calls(os.path.join(package_dir, PROGRAM))
    entries = sorted(calls["native"])
    isa = pick_vec_isa()
    manifest = {
        "format": _FORMAT,
        "max_cache_len": max_cache_len,
        "cache": {name: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")} for name, t in cache.items()},
        "inductor_vec_isa": str(isa),  # what Inductor's generated code was built for, and with which flags
        "inductor_arch_flags": isa.build_arch_flags() if isa else "",
        "native_entries": entries,
        "native_libraries": _copy_libraries(package_dir, entries),
        "zen_sources": native.source_digest(),
        "zentorch": calls["zentorch"],
        "torch": torch.__version__,
    }
    with open(os.path.join(package_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)


def _copy_libraries(package_dir: str, entries: list) -> dict:
    """The built libraries of ``entries`` (and of decode attention's AVX-512 twin, which the op
    prefers where it is bound) and of our C++ ops, copied into the package: name -> file in it."""
    os.makedirs(os.path.join(package_dir, _LIBRARIES), exist_ok=True)
    copied = {}
    for name in [native.OP_LIBRARY, *entries, *(["decode_attention_avx512"] if "decode_attention" in entries else [])]:
        built = native.library_file(name)
        if built:
            copied[name] = f"{_LIBRARIES}/{name}.so"
            shutil.copyfile(built, os.path.join(package_dir, copied[name]))
    return copied


_LIBRARIES = "native"


def _zen_calls(package: str) -> dict:
    """Which of our C++ libraries and whether zentorch the program's calls of zen's ops need, read
    from the calls AOTInductor serialized for its proxy executor."""
    from .attention import PREFILL_NATIVE
    from .kernels import KERNELS
    from .kernels.epilogues import SWIGLU_NATIVE
    from .kernels.op import Plan

    native_used, zentorch = set(), False
    with zipfile.ZipFile(package) as archive:
        for name in (n for n in archive.namelist() if n.endswith("wrapper.json")):
            for call in json.loads(archive.read(name)).get("nodes", []):
                node = call["node"]
                args = {a["name"]: a["arg"] for a in node["inputs"]}
                if node["target"] in ("zen::quant_linear", "zen::quant_linear.by_rows"):
                    plan = Plan.decode(args["plan"]["as_string"])
                    kernels = [KERNELS[k] for k in plan.kernels]
                    native_used.update(k.native for k in kernels if k.native)
                    native_used.update(library for k in kernels for library in k.helpers)
                    if plan.spec.epilogue == "swiglu" and any("swiglu" not in k.epilogues for k in kernels):
                        native_used.add(SWIGLU_NATIVE)  # applied after a kernel that does not fuse it
                    zentorch |= any(k.source == "zentorch" for k in kernels)
                if node["target"] in ("zen::quant_linear.native", "zen::quant_linear.by_rows"):
                    native_used.add(args["entry"]["as_string"])
                elif node["target"] == "zen::decode_attention":
                    native_used.add("decode_attention")  # its AVX-512 twin is used where it loads
                elif node["target"] in ("zen::prefill_attention", "zen::prefill_attention.by_rows"):
                    zentorch |= args["zentorch"]["as_bool"]
                    if not args["zentorch"]["as_bool"] and native.unavailable(PREFILL_NATIVE) is None:
                        native_used.add(PREFILL_NATIVE)  # the prompt's kernel where the op does not fall to ATen
                    if node["target"].endswith("by_rows"):
                        native_used.add("decode_attention")
                elif node["target"] == "zen::unmasked_attention" and native.unavailable(PREFILL_NATIVE) is None:
                    native_used.add(PREFILL_NATIVE)
    return {"native": native_used, "zentorch": zentorch}


def load_ahead_of_time(package_dir: str, figures: CompileFigures | None = None) -> AheadOfTimeGenerator:
    """The generator of a folder ``compile_ahead_of_time`` wrote, in this process; a clear error
    where this CPU or torch cannot run what it holds."""
    start = time.perf_counter()
    manifest = _read_manifest(package_dir)
    _check_this_machine_runs(manifest, package_dir)
    _bind_zen_ops(manifest, package_dir)
    cache = {name: torch.zeros(meta["shape"], dtype=getattr(torch, meta["dtype"]))
             for name, meta in manifest["cache"].items()}
    path = os.path.join(package_dir, PROGRAM)
    # the package loader itself: torch._inductor's wrapper of it imports Inductor
    program = torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, -1)
    constants = {**_weights(path, {}, skip=cache.keys()), **cache}
    missing = sorted(set(program.get_constant_fqns()) - constants.keys())
    if missing:
        raise RuntimeError(f"{path} has no weights for {missing[:3]}: compile it again")
    program.load_constants(constants, False, True, True)  # not the inactive buffer; every one; user-managed
    figures = figures or CompileFigures()
    figures.load_s = time.perf_counter() - start
    return AheadOfTimeGenerator(program, cache, manifest["max_cache_len"], figures)


def _read_manifest(package_dir: str) -> dict:
    path = os.path.join(package_dir, MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{package_dir} is not a package compile_ahead_of_time wrote: no {MANIFEST}")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != _FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, this zen_inductor reads {_FORMAT}: compile again")
    if not os.path.exists(os.path.join(package_dir, PROGRAM)):
        raise FileNotFoundError(f"{package_dir} is not a package compile_ahead_of_time wrote: no {PROGRAM}")
    return manifest


def _check_this_machine_runs(manifest: dict, package_dir: str) -> None:
    if manifest["torch"].split("+")[0] != torch.__version__.split("+")[0]:
        raise RuntimeError(f"{package_dir} was compiled with torch {manifest['torch']}, this is {torch.__version__}: "
                           "compile it again with this torch")
    if manifest["zen_sources"] != native.source_digest():
        raise RuntimeError(f"{package_dir} was compiled by a zen_inductor with other kernels: compile it again")
    lacking = sorted(extensions_of(manifest["inductor_arch_flags"]) - cpu.hardware_flags())
    if lacking:
        raise RuntimeError(f"{package_dir} holds code compiled for {manifest['inductor_vec_isa']}; this CPU lacks "
                           f"{', '.join(lacking)}: compile it again on this machine")
    lacking = {name: native.missing_isa(name) for name in manifest["native_entries"]}
    lacking = {name: reason for name, reason in lacking.items() if reason}
    if lacking:
        raise RuntimeError(f"{package_dir}'s program calls zen kernels this CPU cannot run "
                           f"({'; '.join(f'{n}: {r}' for n, r in lacking.items())}): compile it again on this machine")


def extensions_of(arch_flags: str) -> frozenset:
    """The CPU flags (as /proc/cpuinfo names them) code built with the compiler's ``arch_flags``
    may use: "-mavx512f -mfma -mavx512vnni" -> avx512f, fma, avx512_vnni."""
    return frozenset(_CPUINFO_NAME.get(f, f[2:].replace("-", "_")) for f in arch_flags.split() if f.startswith("-m"))


# the compiler's names whose /proc/cpuinfo name is not the same with "_" for "-"
_CPUINFO_NAME = {"-mavx512vnni": "avx512_vnni", "-mavx512bf16": "avx512_bf16", "-mavx512fp16": "avx512_fp16",
                 "-mavxvnni": "avx_vnni"}


def _bind_zen_ops(manifest: dict, package_dir: str) -> None:
    """Define zen's ops, load and bind the C++ entries the program calls from the package, and
    import zentorch where their ops call it."""
    from . import attention  # noqa: F401  (defines zen::decode_attention and the attention ops)
    from .kernels import op  # noqa: F401  (defines zen::quant_linear)

    reason = cpu.zentorch_unavailable() if manifest["zentorch"] else None
    if reason:
        raise RuntimeError(f"the package calls zentorch's kernels, which cannot run here: {reason}")
    libraries = {name: os.path.join(package_dir, file) for name, file in manifest["native_libraries"].items()}
    native.use_built(libraries)
    entries = list(manifest["native_entries"])
    if "decode_attention_avx512" in libraries and not native.missing_isa("decode_attention_avx512"):
        entries.append("decode_attention_avx512")
    for name in entries:
        native.start(name)
    unbound = {name: native.unavailable(name) for name in entries}
    unbound = {name: reason for name, reason in unbound.items() if reason}
    if unbound:
        raise RuntimeError("zen's kernels cannot be loaded here: " + "; ".join(f"{n}: {r}" for n, r in unbound.items()))


def _weights(package: str, shared: dict, skip) -> dict[str, torch.Tensor]:
    """A program's weights by name, read from its package; weights with the same bytes are one
    tensor (``shared``: what is held so far)."""
    with zipfile.ZipFile(package) as archive:
        config_name = next(n for n in archive.namelist() if n.endswith("/weights_config.json"))
        root = config_name.split("/", 1)[0]
        files, weights = {}, {}
        for fqn, (file, shape, stride, offset) in json.loads(archive.read(config_name)).items():
            if fqn in skip:
                continue
            if file not in files:
                files[file] = torch.load(io.BytesIO(archive.read(f"{root}/data/weights/{file}")), weights_only=True)
            weights[fqn] = _one_copy(files[file], files[file].as_strided(shape, stride, offset), shared)
    return weights


def _one_copy(stored: torch.Tensor, weight: torch.Tensor, shared: dict) -> torch.Tensor:
    """``weight``, or the tensor already held with the same bytes, viewed as ``weight``: e.g. a
    tied model's token table (the embedding's gather reads it) and the output layer packed in the
    file's Q8_0 blocks are one tensor."""
    contiguous = weight.is_contiguous()
    data = (weight if contiguous else weight.contiguous()).view(-1).view(torch.uint8)
    key = (hashlib.sha1(data.numpy()).hexdigest(), data.numel(), *(() if contiguous else (weight.dtype, weight.shape, weight.stride())))
    if key not in shared:
        # a packing the compile put on huge pages is stored as its whole mapping, a huge page
        # larger: it goes back on huge pages (decode reads it every step), without the slack
        slack = stored.untyped_storage().nbytes() - weight.numel() * weight.element_size()
        if slack >= HUGE_PAGE and contiguous:
            placed = on_huge_pages(weight)
            shared[key] = placed if placed is not weight else weight.clone()
        else:
            shared[key] = weight
    held = shared[key]
    if held.dtype == weight.dtype and held.shape == weight.shape:
        return held
    return held.view(-1).view(torch.uint8).view(weight.dtype).view(weight.shape)
