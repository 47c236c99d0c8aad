"""A causal LM compiled ahead of time: AOTInductor with zen's passes, no Python per token.

    generator = zen_inductor.compile_ahead_of_time(model, max_cache_len=1024)
    tokens = generator.generate(input_ids, max_new_tokens=64)

``torch.compile`` pays for every decode step in Python: Dynamo checks its guards over the whole
module tree (~1 ms a SmolLM2 step), and Inductor's Python wrapper makes each kernel call
(~1.4 ms). Both are fixed costs of a step whose kernels take ~4.5 ms
(``benchmarks/results/decode-step-smollm2.md``). Here the model is exported with a static KV
cache (transformers' ``TorchExportableModuleWithStaticCache``) and compiled by AOTInductor with the
same joint pass ``backend="zen"`` installs, twice:

    prefill: input_ids [1, S], S in 2..max_cache_len   decode: input_ids [1, 1]

Each is a C++ program; the two share one KV cache, tensors this object owns and hands both as
user-managed constants, so a prompt's prefill fills what the decode steps read. A step is one
call into C++: the generated wrapper calls the kernels, ours included.

Each program holds its own packed weights (AOTInductor keeps a program's constants with it), so
the packed weights are resident twice while both are loaded.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass

import torch
from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

from . import config, native
from .backend import inductor_config_patches
from .record import CompileRecord

_CACHE_PREFIXES = ("key_cache_", "value_cache_", "cumulative_length_")


@dataclass
class CompileFigures:
    export_s: float = 0.0
    compile_s: float = 0.0


class AheadOfTimeGenerator:
    """Greedy generation through the prefill and decode programs, with one KV cache."""

    def __init__(self, prefill, decode, cache: dict[str, torch.Tensor], max_cache_len: int, figures: CompileFigures):
        self.prefill, self.decode = prefill, decode
        self.cache = cache  # what both programs read and write: keep alive while they are loaded
        self.max_cache_len = max_cache_len
        self.figures = figures

    def _run(self, program, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        (logits,) = program.loader.boxed_run([input_ids, positions])
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
        positions = torch.arange(start, start + length)
        program = self.decode if length == 1 else self.prefill
        return self._run(program, input_ids.contiguous(), positions)

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
            logits = self._run(self.decode, token, position)
            token = logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
            if step_times is not None:
                step_times.append(time.perf_counter() - start)
        return torch.cat([input_ids, *tokens], dim=1)


def compile_ahead_of_time(model: torch.nn.Module, max_cache_len: int, package_dir: str | None = None,
                          options: dict | None = None) -> AheadOfTimeGenerator:
    """Export ``model`` (a transformers causal LM, batch 1) with a static cache of
    ``max_cache_len`` positions and compile its prefill and decode with AOTInductor and zen's
    passes. ``options``: zen's flags for this compile, as ``torch.compile(options=...)``.
    ``package_dir``: where the two ``.pt2`` packages are written (a temporary folder if None)."""
    from torch.export import Dim

    native.check_toolchain()  # the same clear error as the torch.compile door where the C++ build cannot run
    figures = CompileFigures()
    package_dir = package_dir or tempfile.mkdtemp(prefix="zen_aot_")
    os.makedirs(package_dir, exist_ok=True)
    with _static_cache_config(model), torch.no_grad():
        exportable = _LastLogits(model, batch_size=1, max_cache_len=max_cache_len)
        start = time.perf_counter()
        seq = Dim("seq", min=2, max=max_cache_len)
        # strict: Dynamo follows the cache's tensors to the module's buffers (non-strict export
        # sees transformers' in-place cumulative_length update as one on an unlifted constant)
        prefill = torch.export.export(exportable, (), {"input_ids": torch.zeros(1, 4, dtype=torch.long),
                                                      "cache_position": torch.arange(4)},
                                      dynamic_shapes={"input_ids": {1: seq}, "cache_position": {0: seq}}, strict=True)
        # decode: the prefill's graph traced again at one token, its cache a buffer by then: ~8 s
        # for SmolLM2 where a second strict export took ~16
        decode = torch.export.export(prefill.module(check_guards=False), (),
                                     {"input_ids": torch.zeros(1, 1, dtype=torch.long),
                                      "cache_position": torch.zeros(1, dtype=torch.long)}, strict=False)
        programs = {"decode": decode, "prefill": prefill}
        figures.export_s = time.perf_counter() - start
        cache = {name: torch.zeros_like(buffer) for name, buffer in exportable.named_buffers()
                 if name.startswith(_CACHE_PREFIXES)}
        start = time.perf_counter()
        loaded = {}
        for name, program in programs.items():
            path = os.path.join(package_dir, f"{name}.pt2")
            with config.patch(options or {}):
                record = CompileRecord(graph_name=f"aot_{name}")
                # AOTInductor writes the CPU it compiled for into its metadata dict; a fresh one
                # for each compile keeps the global config as it was
                patches = {**inductor_config_patches(record), "aot_inductor.metadata": {}}
                torch._inductor.aoti_compile_and_package(program, package_path=path, inductor_configs=patches)
            loaded[name] = torch._inductor.aoti_load_package(path)
            _share_cache(loaded[name], cache)
        figures.compile_s = time.perf_counter() - start
    return AheadOfTimeGenerator(loaded["prefill"], loaded["decode"], cache, max_cache_len, figures)


class _LastLogits(TorchExportableModuleWithStaticCache):
    """transformers' static-cache module returning the logits of the last position only: generation
    reads nothing else, and the output layer over a whole prompt was the largest GEMM of a prefill
    (49152 x 576 for each of 128 rows: about a third of SmolLM2's Q8_0 TTFT)."""

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        for layer in self.static_cache.layers:  # the call writes from position cache_position[0]
            layer.cumulative_length.copy_(cache_position[0])
        return self.model(input_ids=input_ids, past_key_values=self.static_cache, use_cache=True,
                          logits_to_keep=1).logits


def _share_cache(program, cache: dict[str, torch.Tensor]) -> None:
    names = set(program.get_constant_fqns())
    missing = [n for n in cache if n not in names]
    if missing:
        raise RuntimeError(f"the compiled program has no constant for {missing[:3]}: the KV cache cannot be shared")
    program.load_constants(cache, check_full_update=False, user_managed=True)


@contextlib.contextmanager
def _static_cache_config(model):
    """transformers' export recipe asks the model's generation config for a static cache; the
    user's config is restored afterwards."""
    generation_config = model.generation_config
    saved = generation_config.use_cache, generation_config.cache_implementation
    generation_config.use_cache, generation_config.cache_implementation = True, "static"
    try:
        yield
    finally:
        generation_config.use_cache, generation_config.cache_implementation = saved
