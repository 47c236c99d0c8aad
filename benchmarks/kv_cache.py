"""Accuracy of the narrow KV caches on the real model: perplexity and decode logits against the
cache in the model's own dtype.

    python benchmarks/kv_cache.py [--tokens 1024,2048] [--steps 32] [--caches int8,bf16]
                                  [--out benchmarks/results] [--name kv-cache-smollm2]

SmolLM2-135M-Instruct from its GGUF Q4_1 file, two ways: the file's blocks with fp32 activations
(fp32 cache) and its weights dequantized to a bf16 model (bf16 cache). For each, the first N
tokens of ``benchmarks/data/prose.txt`` are scored in one forward pass *through a static cache*
(every position's attention reads its keys and values back from the cache), once with
transformers' StaticCache and once with each narrow cache (``zen_inductor.Int8StaticCache``;
``zen_inductor.Bf16StaticCache`` beside the fp32 model), eager and compiled by zen.
Decode: logits of ``--steps`` steps after a 512-token prompt, both fed the full cache's greedy
tokens, the narrow cache's against the full cache's (SQNR), and how often they choose the same
token. The bar (#29): perplexity with a narrow cache <= 1.01x the full cache's. Speed:
``benchmarks/smollm2.py`` with systems zen-kv8, zen-kv16 and llamacpp-kv8.
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


def narrow_caches(names: str) -> dict:
    """name -> cache class of the narrow caches asked for."""
    import zen_inductor

    known = {"int8": zen_inductor.Int8StaticCache, "bf16": zen_inductor.Bf16StaticCache}
    return {name: known[name] for name in names.split(",")}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="1024,2048")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--caches", default="int8,bf16", help="narrow caches against the full one: int8, bf16")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--name", default="kv-cache-smollm2")
    args = p.parse_args()
    from smollm2 import prose_ids  # noqa: the benchmark beside this one
    from transformers import StaticCache

    from zen_inductor.smollm2 import gguf_path
    from zen_inductor.verification import sqnr_db as sqnr

    text = torch.tensor([prose_ids(gguf_path())])
    lengths = [int(n) for n in args.tokens.split(",")]
    caches = narrow_caches(args.caches)
    ppl_rows, decode_rows = [], []
    for name, model in models():
        # a bf16 cache beside a bf16 model is the model's own cache
        narrow = {c: cls for c, cls in caches.items() if not (c == "bf16" and model.dtype == torch.bfloat16)}
        if not narrow:
            continue
        torch._dynamo.reset()
        systems = (("eager", model.forward), ("zen", torch.compile(model.forward, backend="zen")))
        for system, forward in systems:
            for n in lengths:
                ids = text[:, :n]
                full = cached_perplexity(forward, model.config, StaticCache, ids)
                for cache, cls in narrow.items():
                    ppl = cached_perplexity(forward, model.config, cls, ids)
                    ppl_rows.append((name, system, cache, n, full, ppl))
                    print(f"{name}, {system}, {cache}, {n} tokens: perplexity {full:.3f} -> {ppl:.3f} ({ppl / full:.4f}x)", flush=True)
            full = decode_logits(forward, model.config, StaticCache, text[:, :512], args.steps)
            for cache, cls in narrow.items():
                logits = decode_logits(forward, model.config, cls, text[:, :512], args.steps, tokens=full)
                agree = int((full.argmax(-1) == logits.argmax(-1)).sum())
                decode_rows.append((name, system, cache, sqnr(logits, full), agree, full.shape[0]))
                print(f"{name}, {system}, {cache}, decode: {sqnr(logits, full):.1f} dB, greedy {agree}/{full.shape[0]}", flush=True)
    write(args, ppl_rows, decode_rows)


def write(args, ppl_rows: list, decode_rows: list) -> None:
    from zen_inductor.cpu import describe as describe_cpu

    lines = [f"# Narrow KV caches on SmolLM2-135M-Instruct: accuracy ({time.strftime('%Y-%m-%d')})", "",
             f"`python benchmarks/kv_cache.py --caches {args.caches}`. Machine: {describe_cpu()}. Text: "
             "`benchmarks/data/prose.txt`, scored in one forward pass through the cache (every position's attention "
             "reads keys and values back from it). int8: `zen_inductor.Int8StaticCache` (symmetric, one fp32 scale a "
             "KV head and position); bf16: `zen_inductor.Bf16StaticCache` (the fp32 model only); full: "
             "transformers' StaticCache in the model's dtype.", "",
             "| model | system | cache | tokens | perplexity, full cache | narrow cache | narrow / full |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {m} | {s} | {c} | {n} | {f:.3f} | {i:.3f} | {i / f:.4f}x |" for m, s, c, n, f, i in ppl_rows]
    lines += ["", f"Decode after a 512-token prompt, {args.steps} decode steps: "
              "logits with the narrow cache against the full cache's, both fed the full cache's greedy tokens; the next "
              "token each would choose, compared step by step.", "",
              "| model | system | cache | logits SQNR dB | same next token |", "|---|---|---|---|---|"]
    lines += [f"| {m} | {s} | {c} | {q:.1f} | {a}/{t} |" for m, s, c, q, a, t in decode_rows]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, args.name + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
