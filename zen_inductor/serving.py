"""Zen as vLLM's compile backend: the real model as a folder vLLM loads, the formats vLLM
quantizes it into, and the arguments that ask for zen.

vLLM compiles its model with ``torch.compile``. In its modes 1 and 2 a backend name that torch's
registry knows is passed on as it is, so ``compilation_config={"mode": 2, "backend": "zen"}``
runs zen's passes on vLLM's graph (mode 3, vLLM's own piecewise compile, takes only "inductor";
on CPU vLLM turns it into mode 2 with Inductor). What zen meets there:

* bf16: on AMD CPUs with AVX-512 and zentorch installed (zen installs it) vLLM runs its linears in
  zentorch's op on weights zentorch prepacked: zen leaves them to it (faster than ours on every M
  we measured) and says so in its dumps; elsewhere they are ``F.linear`` and dense_matmul takes them.
* torchao (``quantization="torchao"``): vLLM quantizes the bf16 weights when it loads them and
  calls ``F.linear`` on torchao's tensors, which dequant_matmul matches: int8 weights with int8
  dynamic activations (W8A8) and int4 weight-only in groups of 32.

Everything is local: the folder is written from the GGUF file of the demo (no hub).
"""
from __future__ import annotations

import json
import os

from .smollm2 import cache_folder, gguf_path

FORMATS = ("bf16", "int8dq", "int4wo")
BACKENDS = ("default", "zen")  # vLLM's own choice on CPU (Inductor, mode 2) and zen


def model_folder() -> str:
    """SmolLM2-135M-Instruct as a Hugging Face folder (bf16 safetensors, tokenizer, chat
    template), written once from the demo's GGUF file: its Q4_1 blocks dequantized to bf16."""
    path = os.path.join(cache_folder(), "SmolLM2-135M-Instruct-bf16")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    import torch

    from .gguf_model import load_gguf

    model, tokenizer = load_gguf(gguf_path(), dtype=torch.bfloat16, quantized=False)
    return _write_folder(path, model, tokenizer)


def tiny_folder() -> str:
    """A random-weight Llama (4 layers, 8 heads, 4 KV heads: SmolLM2's 9 and 3 split over no even
    number of tensor-parallel workers) with SmolLM2's tokenizer, for tests of vLLM's tensor
    parallelism. Weights drawn wider than transformers' init so that greedy choices are not ties."""
    path = os.path.join(cache_folder(), "tiny-llama-tp-bf16")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    import torch
    import transformers

    source = model_folder()
    config = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
        vocab_size=transformers.AutoConfig.from_pretrained(source).vocab_size, max_position_embeddings=2048,
        initializer_range=0.08, tie_word_embeddings=True, dtype="bfloat16")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    return _write_folder(path, model, transformers.AutoTokenizer.from_pretrained(source))


def _write_folder(path: str, model, tokenizer) -> str:
    import shutil
    import tempfile

    partial = tempfile.mkdtemp(dir=os.path.dirname(path))
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        os.replace(partial, path)  # whole or not at all: a later call finds it complete
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return path


def torchao_config(fmt: str):
    """The torchao config vLLM quantizes the bf16 weights with; None for bf16."""
    import torch
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    if fmt == "bf16":
        return None
    if fmt == "int8dq":
        # torchao would otherwise set Inductor's global options in vLLM's worker
        return Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    if fmt == "int4wo":
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))
    raise ValueError(f"format {fmt!r}: one of {FORMATS}")


def engine_args(fmt: str, backend: str, max_model_len: int = 1024, model: str | None = None) -> dict:
    """Keyword arguments of ``vllm.LLM`` (and, spelled as flags, of vLLM's server) for ``model``
    (default: ``model_folder()``) in ``fmt`` compiled by ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: one of {BACKENDS}")
    args = {"model": model or model_folder(), "max_model_len": max_model_len, "dtype": "bfloat16"}
    config = torchao_config(fmt)
    if config is not None:
        from torchao.core.config import config_to_dict

        args["quantization"] = "torchao"
        args["hf_overrides"] = {"quantization_config_dict_json": json.dumps(config_to_dict(config))}
    if backend == "zen":
        args["compilation_config"] = {"mode": 2, "backend": "zen"}
    return args


def serve_flags(fmt: str, backend: str, max_model_len: int = 1024) -> list[str]:
    """``engine_args`` as flags of vLLM's OpenAI-compatible server."""
    flags = []
    for key, value in engine_args(fmt, backend, max_model_len).items():
        flags += [f"--{key.replace('_', '-')}", json.dumps(value) if isinstance(value, dict) else str(value)]
    return flags
