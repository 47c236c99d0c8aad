"""Accuracy of the int8 KV cache on the real model: perplexity and decode logits against the cache
in the model's own dtype.

    python benchmarks/kv_cache.py [--tokens 1024,2048] [--steps 32] [--out benchmarks/results]

SmolLM2-135M-Instruct from its GGUF Q4_1 file, two ways: the file's blocks with fp32 activations
(fp32 cache) and its weights dequantized to a bf16 model (bf16 cache). For each, the first N
tokens of ``benchmarks/data/prose.txt`` are scored in one forward pass *through a static cache*
(every position's attention reads its keys and values back from the cache), once with
transformers' StaticCache and once with ``zen_inductor.Int8StaticCache``, eager and compiled by zen.
Decode: logits of ``--steps`` steps after a 512-token prompt, both fed the full cache's greedy
tokens, the int8 cache's against the full cache's (SQNR), and how often they choose the same token. The bar (#29): perplexity with the int8
cache <= 1.01x the full cache's. Speed: ``benchmarks/smollm2.py`` with systems zen-kv8 and
llamacpp-kv8.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def models():
    """(name, model) of SmolLM2: the file's blocks (fp32 activations), and bf16 dequantized weights."""
    from zen_inductor import load_gguf
    from zen_inductor.smollm2 import gguf_path

    yield "Q4_1 blocks, fp32", load_gguf(gguf_path())[0]
    yield "dequantized, bf16", load_gguf(gguf_path(), dtype=torch.bfloat16, quantized=False)[0]


@torch.no_grad()
def cached_perplexity(forward, config, cache_class, ids) -> float:
    cache = cache_class(config=config, max_cache_len=ids.shape[1])
    logits = forward(input_ids=ids, past_key_values=cache, use_cache=True).logits.float()
    return float(torch.exp(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])))


@torch.no_grad()
def decode_logits(forward, config, cache_class, prompt, steps: int, tokens=None) -> torch.Tensor:
    """Logits of the prompt's last position and of ``steps`` decode steps, [steps + 1, vocab]; each
    step is fed the greedy token of the step before, or ``tokens`` (another run's logits) where given."""
    length = prompt.shape[1]
    cache = cache_class(config=config, max_cache_len=length + steps)
    rows = [forward(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]]
    for i in range(steps):
        token = (rows[-1] if tokens is None else tokens[i:i + 1]).argmax(-1, keepdim=True)
        rows.append(forward(input_ids=token.view(1, 1), past_key_values=cache, cache_position=torch.tensor([length + i]),
                            use_cache=True, logits_to_keep=1).logits[:, -1])
    return torch.cat(rows).float()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="1024,2048")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args()
    from smollm2 import prose_ids  # noqa: the benchmark beside this one
    from zen_inductor.cpu import describe as describe_cpu
    from transformers import StaticCache

    from zen_inductor import Int8StaticCache
    from zen_inductor.smollm2 import gguf_path
    from zen_inductor.verification import sqnr_db as sqnr

    text = torch.tensor([prose_ids(gguf_path())])
    lengths = [int(n) for n in args.tokens.split(",")]
    ppl_rows, decode_rows = [], []
    for name, model in models():
        torch._dynamo.reset()
        systems = (("eager", model.forward), ("zen", torch.compile(model.forward, backend="zen")))
        for system, forward in systems:
            for n in lengths:
                ids = text[:, :n]
                full = cached_perplexity(forward, model.config, StaticCache, ids)
                int8 = cached_perplexity(forward, model.config, Int8StaticCache, ids)
                ppl_rows.append((name, system, n, full, int8))
                print(f"{name}, {system}, {n} tokens: perplexity {full:.3f} -> {int8:.3f} ({int8 / full:.4f}x)", flush=True)
            full = decode_logits(forward, model.config, StaticCache, text[:, :512], args.steps)
            int8 = decode_logits(forward, model.config, Int8StaticCache, text[:, :512], args.steps, tokens=full)
            agree = int((full.argmax(-1) == int8.argmax(-1)).sum())
            decode_rows.append((name, system, sqnr(int8, full), agree, full.shape[0]))
            print(f"{name}, {system}, decode: {sqnr(int8, full):.1f} dB, greedy {agree}/{full.shape[0]}", flush=True)
    lines = [f"# The int8 KV cache on SmolLM2-135M-Instruct: accuracy ({time.strftime('%Y-%m-%d')})", "",
             f"`python benchmarks/kv_cache.py`. Machine: {describe_cpu()}. Text: `benchmarks/data/prose.txt`, scored in one "
             "forward pass through the cache (every position's attention reads keys and values back from it). "
             "int8: `zen_inductor.Int8StaticCache` (symmetric, one fp32 scale a KV head and position); full: "
             "transformers' StaticCache in the model's dtype.", "",
             "| model | system | tokens | perplexity, full cache | int8 cache | int8 / full |", "|---|---|---|---|---|---|"]
    lines += [f"| {m} | {s} | {n} | {f:.3f} | {i:.3f} | {i / f:.4f}x |" for m, s, n, f, i in ppl_rows]
    lines += ["", f"Decode after a 512-token prompt, {args.steps} decode steps: "
              "logits with the int8 cache against the full cache's, both fed the full cache's greedy tokens; the next "
              "token each would choose, compared step by step.", "",
              "| model | system | logits SQNR dB | same next token |", "|---|---|---|---|"]
    lines += [f"| {m} | {s} | {q:.1f} | {a}/{t} |" for m, s, q, a, t in decode_rows]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kv-cache-smollm2.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
