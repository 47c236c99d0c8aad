"""A causal LM compiled ahead of time: AOTInductor with zen's passes, no Python per token.

    generator = zen_inductor.compile_ahead_of_time(model, max_cache_len=1024)
    tokens = generator.generate(input_ids, max_new_tokens=64)

``torch.compile`` pays for every decode step in Python: Dynamo checks its guards over the whole
module tree (~1 ms a SmolLM2 step), and Inductor's Python wrapper makes each kernel call
(~1.4 ms). Both are fixed costs of a step whose kernels take ~4.5 ms
(``benchmarks/results/decode-step-smollm2.md``). Here the model is exported with a static KV
cache (transformers' ``TorchExportableModuleWithStaticCache``) and compiled by AOTInductor with the
same joint pass ``backend="zen"`` installs, once, for every length:

    input_ids [1, S], S in 1..max_cache_len: a prompt, then one token a decode step

One C++ program; its KV cache is tensors this object owns and hands it as user-managed constants.
A step is one call into C++: the generated wrapper calls the kernels, ours included. Where a
length of one needs other kernels than a prompt (a linear's GEMV, decode attention), zen's ops
take one row in C++ and more by their plan (``zen::quant_linear.by_rows``,
``zen::prefill_attention.by_rows``). One program, not a prefill and a decode compiled apart: the
compile is Inductor's work once (SmolLM2: ~41 s where two programs took ~71).

The folder written is a package: ``load_ahead_of_time(folder)`` runs it in another process with
no model code, and this call returns it loaded the same way (``aot_package.py``: one copy of the
weights).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time

import torch
from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

from . import config, dumps, native
from .aot_package import PROGRAM, AheadOfTimeGenerator, CompileFigures, load_ahead_of_time, write_manifest
from .backend import inductor_config_patches
from .gguf_model import dequantize_as_one_op
from .record import CompileRecord

_CACHE_PREFIXES = ("key_cache_", "value_cache_", "cumulative_length_")


def compile_ahead_of_time(model: torch.nn.Module, max_cache_len: int, package_dir: str | None = None,
                          options: dict | None = None) -> AheadOfTimeGenerator:
    """Export ``model`` (a transformers causal LM, batch 1) with a static cache of
    ``max_cache_len`` positions and compile it with AOTInductor and zen's passes, for a prompt and
    for each decode step. ``options``: zen's flags for this compile, as
    ``torch.compile(options=...)``; zentorch is left out unless they say ``use_zentorch=True`` (a
    package that calls it makes every process loading it import zentorch, and Inductor with it:
    ~125 MB resident, for a few percent of TTFT).
    ``package_dir``: where the package is written (a temporary folder if None), for
    ``load_ahead_of_time`` in any process on a CPU like this one."""
    from torch.export import Dim

    native.check_toolchain()  # the same clear error as the torch.compile door where the C++ build cannot run
    figures = CompileFigures()
    package_dir = package_dir or tempfile.mkdtemp(prefix="zen_aot_")
    os.makedirs(package_dir, exist_ok=True)
    with _static_cache_config(model), dequantize_as_one_op(model), torch.no_grad():
        exportable = _LastLogits(model, batch_size=1, max_cache_len=max_cache_len)
        start = time.perf_counter()
        seq = Dim("seq", min=1, max=max_cache_len)
        # non-strict: 7 s for SmolLM2 where Dynamo's strict export took 18 (_LastLogits.forward
        # says how the cache's writes stay writes to its buffers)
        program = torch.export.export(exportable, (), {"input_ids": torch.zeros(1, 4, dtype=torch.long),
                                                      "cache_position": torch.arange(4)},
                                      dynamic_shapes={"input_ids": {1: seq}, "cache_position": {0: seq}}, strict=False)
        figures.export_s = time.perf_counter() - start
        cache = {name: buffer for name, buffer in exportable.named_buffers() if name.startswith(_CACHE_PREFIXES)}
        start = time.perf_counter()
        with config.patch({"use_zentorch": False, **(options or {})}):
            record = CompileRecord(graph_name="aot_model")
            # AOTInductor writes the CPU it compiled for into its metadata dict; a fresh one
            # keeps the global config as it was
            patches = {**inductor_config_patches(record), "aot_inductor.metadata": {},
                       # weights beside the code, not in the .so: loading copied a .so's constants
                       # out of its mapping (both resident)
                       "aot_inductor.package_constants_in_so": False,
                       "aot_inductor.package_constants_on_disk_format": "pickle_weights"}
            torch._inductor.aoti_compile_and_package(program, package_path=os.path.join(package_dir, PROGRAM),
                                                     inductor_configs=patches)
            dumps.finish(record)  # debug_dir, zen_inductor.reports() and the log line, as torch.compile's
        figures.compile_s = time.perf_counter() - start
        write_manifest(package_dir, cache, max_cache_len)
    return load_ahead_of_time(package_dir, figures)


class _LastLogits(TorchExportableModuleWithStaticCache):
    """transformers' static-cache module returning the logits of the last position only: generation
    reads nothing else, and the output layer over a whole prompt was the largest GEMM of a prefill
    (49152 x 576 for each of 128 rows: about a third of SmolLM2's Q8_0 TTFT)."""

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        # The cache's layers hold its tensors as plain attributes, which a non-strict export takes
        # for constants (and a write to one for a write to a copy); the module registers the same
        # tensors as buffers, which export traces. The layers read those for the call.
        layers = self.static_cache.layers
        held = [(layer.keys, layer.values, layer.cumulative_length) for layer in layers]
        for i, layer in enumerate(layers):
            layer.keys, layer.values, layer.cumulative_length = (
                getattr(self, f"{prefix}{i}") for prefix in _CACHE_PREFIXES)
        try:
            for layer in layers:  # the call writes from position cache_position[0]
                layer.cumulative_length.copy_(cache_position[0])
            return self.model(input_ids=input_ids, past_key_values=self.static_cache, use_cache=True,
                              logits_to_keep=1).logits
        finally:
            for layer, tensors in zip(layers, held):
                layer.keys, layer.values, layer.cumulative_length = tensors


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
