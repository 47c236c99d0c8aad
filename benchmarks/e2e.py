"""End-to-end LLM decode benchmark: zen against its peers, one machine, one run.

    python benchmarks/e2e.py [--formats bf16,int4wo,...] [--systems eager,inductor,recipe,zentorch,zen]
                             [--model llama1b-4l|qwen3-4l|tiny] [--reps 3] [--out benchmarks/results]
                             [--prompt 128] [--cache dynamic|static] [--batch 1] [--isa native|avx2]

Every (format, system) runs in its own process (compile time and peak RSS are its own), in an
order that alternates systems so slow drift of the shared machine spreads over all of them.
Each process: build the model (random weights, transformers), quantize with torchao, compile,
warm up, then ``reps`` greedy generations; TTFT and TPOT are medians. Results: a JSON per run and
a markdown table with ratios of zen to the best peer.

The KV cache: transformers' DynamicCache (default), or with ``--cache static`` a StaticCache of the
prompt plus the new tokens, as ``generate(cache_implementation="static")`` makes (results then in
``e2e-MODEL-static-cache-pPROMPT``); system ``zen-kv8`` is zen generating through
``zen_inductor.Int8StaticCache`` instead. ``--batch B`` decodes B equal-length prompts at once
(results in ``...-bB``; the table gains decode tokens/s, B over TPOT); with ``--padded`` the B
prompts differ in length (row i: PROMPT - i * PROMPT / 2B tokens), left-padded into one batch
with its attention mask as transformers' ``generate`` pads them (results in ``...-bB-padded``).
``--isa avx2`` runs every system as on an AVX2-only CPU (results in ``...-avx2``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import tempfile
import sys
import time

from zen_inductor.cpu import describe as describe_cpu

MODELS = {
    # Llama-3.2-1B shapes, 4 layers, vocab 32000, tied embeddings
    "llama1b-4l": dict(family="llama", hidden=2048, intermediate=8192, heads=32, kv_heads=8, layers=4, vocab=32000),
    # Qwen3-0.6B shapes (head size 128, per-head q/k norms), 4 layers, vocab 32000, tied embeddings
    "qwen3-4l": dict(family="qwen3", hidden=1024, intermediate=3072, heads=16, kv_heads=8, head_dim=128, layers=4, vocab=32000),
    "tiny": dict(family="llama", hidden=256, intermediate=512, heads=4, kv_heads=2, layers=2, vocab=1024),
}
FORMATS = ("bf16", "int4wo", "int8dq", "int8wo", "da8w4")
SYSTEMS = ("eager", "inductor", "recipe", "zentorch", "zen")  # also: "zen-a8", "zen-nocopies" (see compiled_forward)


def build(spec: dict):
    import torch
    import transformers

    names = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}[spec["family"]]
    cfg = getattr(transformers, names[0])(
        hidden_size=spec["hidden"], intermediate_size=spec["intermediate"], num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"], vocab_size=spec["vocab"],
        max_position_embeddings=8192, tie_word_embeddings=True, **({"head_dim": spec["head_dim"]} if "head_dim" in spec else {}),
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return getattr(transformers, names[1])(cfg).to(torch.bfloat16).eval()


def quant_config(fmt: str):
    import torch
    from torchao.quantization import (Int8DynamicActivationInt8WeightConfig, Int8DynamicActivationIntxWeightConfig,
                                      Int8WeightOnlyConfig, IntxWeightOnlyConfig)
    from torchao.quantization.granularity import PerGroup

    cfg = {
        "bf16": None,
        "int4wo": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(128)),
        "int8dq": lambda: Int8DynamicActivationInt8WeightConfig(),
        "int8wo": lambda: Int8WeightOnlyConfig(),
        "da8w4": lambda: Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(128)),
    }[fmt]
    if cfg is None:
        return None
    cfg = cfg()
    if hasattr(cfg, "set_inductor_config"):
        cfg.set_inductor_config = False
    return cfg


def compiled_forward(model, system: str):
    import torch

    if system == "eager":
        return model.forward
    # every compiled system gets Inductor's global freezing flag, as a user following its CPU
    # docs sets it: Dynamo then guards parameters by identity (zen freezes in any case)
    torch._inductor.config.freezing = True
    if system in ("zen", "zen-kv8"):
        return torch.compile(model.forward, backend="zen")
    if system == "zen-a8":  # zen, letting int8-activation kernels serve weight-only linears too
        return torch.compile(model.forward, backend="zen", options={"int8_activations_for_weight_only": True})
    if system == "zen-nocopies":  # zen without bf16 copies of quantized weights for prefill
        return torch.compile(model.forward, backend="zen", options={"dequantized_copies": False})
    if system == "zentorch":
        import zentorch  # noqa: F401  registers the backend

        return torch.compile(model.forward, backend="zentorch")
    if system == "recipe":
        # PyTorch's own CPU recipe for quantized LLMs (what torchao's set_inductor_config and the
        # Inductor CPU docs recommend), set globally as users do
        c = torch._inductor.config
        c.cpp_wrapper = True
        c.max_autotune = True
        c.cpp.enable_concat_linear = True
        c.cpp.use_small_dequant_buffer = True
        return torch.compile(model.forward)
    return torch.compile(model.forward)  # stock Inductor, frozen like the others


def step_logits(forward, prompt, make_cache=None, mask=None) -> tuple:
    """The prompt's next-token logits and the next step's, as generate() calls the model (its graphs)."""
    import torch
    from transformers import DynamicCache

    cache = make_cache() if make_cache is not None else DynamicCache()
    padding = {}
    if mask is not None:
        padding = dict(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_(min=0))
    first = forward(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1, **padding).logits.float()
    if mask is not None:
        padding = dict(attention_mask=torch.cat([mask, mask.new_ones((mask.shape[0], 1))], 1),
                       position_ids=padding["position_ids"][:, -1:] + 1)
    step = forward(input_ids=prompt[:, -1:], past_key_values=cache, use_cache=True, logits_to_keep=1, **padding).logits.float()
    return first, step


def sqnr_db(y, ref) -> float:
    import torch

    return float(10 * torch.log10(ref.pow(2).mean() / (y - ref).pow(2).mean().clamp_min(1e-30)))


# logits this far from eager's (same weights, same process) are not the model's: a system's times
# then say nothing (stock Inductor's int8-dynamic linears at one row of a [1, 1, K] x gave -78 dB
# on an AMX Xeon; random-weight logits of right systems sit at 18-50 dB from eager's)
WRONG_DB = 10.0


def one_run(args) -> dict:
    """Child process: one (format, system)."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from zen_inductor.demo import generate, left_padded

    spec = MODELS[args.model]
    model = build(spec)
    cfg = quant_config(args.format)
    if cfg is not None:
        from torchao.quantization import quantize_

        quantize_(model, cfg)  # every Linear, lm_head included, as quantize_ does by default
    torch.manual_seed(1)
    prompt, mask = torch.randint(0, spec["vocab"], (args.batch, args.prompt)), None
    if args.padded:
        prompt, mask = left_padded([row[i * args.prompt // (2 * args.batch):] for i, row in enumerate(prompt)])
    make_cache = cache_maker(model, args.system, args.cache, args.prompt + args.new)
    with torch.no_grad():
        eager = step_logits(model.forward, prompt, make_cache, mask)
        forward = compiled_forward(model, args.system)
        t0 = time.perf_counter()
        generate(forward, prompt, 4, make_cache, mask)
        compile_s = time.perf_counter() - t0
        ttfts, tpots, tokens = [], [], None
        for _ in range(args.reps):
            tokens, ttft, steps = generate(forward, prompt, args.new, make_cache, mask)
            ttfts.append(ttft * 1e3)
            tpots.append(statistics.median(steps) * 1e3)
        compiled = step_logits(forward, prompt, make_cache, mask)
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the fp32 twin below
        # the model before quantization, in fp32: what every format approximates, where eager's own
        # arithmetic may be wrong (capped at AVX2, torch._int_mm's sums saturate)
        twin = build(spec).float()
        fp32 = step_logits(twin.forward, prompt, cache_maker(twin, "eager", args.cache, args.prompt + args.new), mask)
    return {
        "format": args.format, "system": args.system, "model": args.model,
        "ttft_ms": statistics.median(ttfts), "tpot_ms": statistics.median(tpots), "compile_s": compile_s,
        "peak_rss_mb": peak_rss_mb, "tokens": tokens.tolist()[0],
        "batch": args.batch, "logits_db": min(sqnr_db(c, e) for c, e in zip(compiled, eager)),
        "fp32_db": min(sqnr_db(c, e) for c, e in zip(compiled, fp32)), "caches": cache_use(args.system),
    }


def cache_maker(model, system: str, cache: str, length: int):
    """What makes each generation's KV cache: None (DynamicCache), a StaticCache of ``length``, or for
    zen-kv8 an Int8StaticCache."""
    if system == "zen-kv8":
        from zen_inductor import Int8StaticCache

        return lambda: Int8StaticCache(config=model.config, max_cache_len=length)
    if cache == "static":
        from transformers import StaticCache

        return lambda: StaticCache(config=model.config, max_cache_len=length)
    return None


def results_name(args) -> str:
    return (f"e2e-{args.model}" + (f"-{args.cache}-cache-p{args.prompt}" if args.cache != "dynamic" else "")
            + (f"-b{args.batch}" if args.batch > 1 else "") + ("-padded" if args.padded else "")
            + ("-avx2" if args.isa == "avx2" else ""))


def cache_use(system: str) -> str:
    """What the compile found in the caches: Inductor's FX graph cache, and zen's tuning cache.

    A compile time means little without it: a warm FX graph cache skips Inductor's code
    generation, a warm tuning cache skips timing kernels.
    """
    from torch._dynamo.utils import counters

    fx = counters["inductor"]
    graphs = fx["fxgraph_cache_hit"] + fx["fxgraph_cache_miss"] + fx["fxgraph_cache_bypass"]
    text = f"FX graph cache {fx['fxgraph_cache_hit']}/{graphs} hit"
    if _is_zen(system):
        import zen_inductor

        bins = {}  # graphs of one model share tunings: count each (linear shape, bin) once
        for report in zen_inductor.reports():
            for linear in report["autotune"]:
                for b in linear.get("bins", []):
                    bins.setdefault((linear["kind"], linear["n"], linear["k"], b["bin"]), b)
        cached = sum(1 for b in bins.values() if b["cached"])
        text += f"; tuning cache {cached}/{len(bins)} bins"
    return text


def run_arguments(systems) -> argparse.ArgumentParser:
    """What every end-to-end benchmark asks: model, formats, systems, prompt and output lengths."""
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama1b-4l", choices=sorted(MODELS))
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--systems", default=",".join(systems))
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--cache", default="dynamic", choices=("dynamic", "static"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    return p


def main():
    p = run_arguments(SYSTEMS)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--merge", action="store_true", help="keep other rows of an earlier run of this model")
    p.add_argument("--padded", action="store_true", help="prompts of B lengths, left-padded with an attention mask")
    p.add_argument("--cold", action="store_true", help="every process compiles with empty Inductor and zen caches")
    p.add_argument("--isa", choices=("native", "avx2"), default="native",
                   help="avx2: every system as on an AVX2-only CPU (smollm2.py's ISA_AVX2 in each process)")
    p.add_argument("--child", nargs=2, metavar=("FORMAT", "SYSTEM"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.format, args.system = args.child
        print("RESULT " + json.dumps(one_run(args)), flush=True)
        return
    results, capped = [], isa_env(args)
    for fmt in args.formats.split(","):
        systems = args.systems.split(",")
        for i, system in enumerate(systems if len(results) % 2 == 0 else reversed(systems)):
            print(f"[{fmt} / {system}] running...", flush=True)
            if args.cold:
                with tempfile.TemporaryDirectory(prefix="zen-e2e-") as root:
                    r = run_child(args, fmt, system, env={**cold_caches(root), **capped})
            else:
                r = run_child(args, fmt, system, env={**os.environ, **capped} if capped else None)
            if "error" in r:
                print(f"[{fmt} / {system}] failed: {r['error']}", flush=True)
                results.append({"format": fmt, "system": system, "error": r["error"]})
                continue
            results.append(r)
            print(f"[{fmt} / {system}] TTFT {r['ttft_ms']:.1f} ms, TPOT {r['tpot_ms']:.2f} ms, compile {r['compile_s']:.1f} s, RSS {r['peak_rss_mb']:.0f} MB", flush=True)
            write(results, args, quiet=True)  # a long run that is stopped keeps what it measured
    write(results, args)


def run_child(args, fmt: str, system: str, env=None) -> dict:
    """One (format, system) in its own process: its result, or {"error": last line of stderr}."""
    cmd = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--prompt", str(args.prompt), "--new",
           str(args.new), "--reps", str(args.reps), "--cache", args.cache, "--batch", str(args.batch), *(["--padded"] if args.padded else []), "--child", fmt, system]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(line[7:])


def isa_env(args) -> dict:
    """What a child's environment adds for ``--isa``: nothing, or the caps of every library at AVX2."""
    if args.isa != "avx2":
        return {}
    from smollm2 import ISA_AVX2

    return ISA_AVX2


def cold_caches(root: str) -> dict:
    """The environment of a process whose compiles find Inductor's and zen's caches empty."""
    return {**os.environ, "TORCHINDUCTOR_CACHE_DIR": os.path.join(root, "inductor"),
            "ZEN_INDUCTOR_CACHE_DIR": os.path.join(root, "zen")}


def write(results, args, quiet=False):
    os.makedirs(args.out, exist_ok=True)
    name = results_name(args)
    previous = os.path.join(args.out, f"{name}.json")
    if (args.merge or quiet) and os.path.exists(previous):  # re-measured (format, system) pairs replace old ones
        with open(previous) as f:
            old = json.load(f)["results"]
        fresh = {(r["format"], r["system"]) for r in results}
        results = [r for r in old if (r["format"], r["system"]) not in fresh] + results
    stamp = time.strftime("%Y-%m-%d")
    meta = {"date": stamp, "machine": platform.processor() or platform.machine(), "cpu": describe_cpu(), "threads": os.cpu_count(),
            "model": args.model, "prompt": args.prompt, "new": args.new, "reps": args.reps, "cache": args.cache,
            "batch": args.batch, "padded": args.padded, "isa": args.isa,
            "versions": _versions()}
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    batch = f"batch {args.batch}" + (f" (prompts of {args.prompt // 2 + args.prompt // (2 * args.batch)}-{args.prompt} tokens, left-padded)" if args.padded else "")
    lines = [f"# e2e: {args.model}, prompt {args.prompt}, {args.new} new tokens, {batch}, greedy, {args.cache} "
             f"KV cache ({stamp})", "",
             f"Machine: {meta['cpu']}, {meta['threads']} cores"
             + (", every system capped at AVX2 (`--isa avx2`: zen, ATen, Inductor, MKL and oneDNN)"
                if meta["isa"] == "avx2" else "") + f". Versions: {meta['versions']}.", "",
             "| format | system | TTFT ms | TPOT ms | decode tokens/s | compile s | peak RSS MB | tokens = eager | "
             "logits dB vs eager | logits dB vs fp32 | zen vs best peer | caches at compile |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for fmt in dict.fromkeys(r["format"] for r in results):
        rows = [r for r in results if r["format"] == fmt]
        eager = next((r for r in rows if r.get("system") == "eager" and "tokens" in r), None)
        peers = [r for r in rows if not _is_zen(r.get("system", "")) and "ttft_ms" in r
                 and r.get("logits_db", WRONG_DB) >= WRONG_DB]  # a wrong output is not a peer
        for r in rows:
            if "error" in r:
                lines.append(f"| {fmt} | {r['system']} | failed: {r['error'][:80]} | | | | | | | | | |")
                continue
            same = token_agreement(r.get("tokens"), eager.get("tokens") if eager else None)
            ratio = ""
            if _is_zen(r["system"]) and peers:
                best_ttft = min(p["ttft_ms"] for p in peers)
                best_tpot = min(p["tpot_ms"] for p in peers)
                ratio = f"TTFT {r['ttft_ms'] / best_ttft:.2f}x, TPOT {r['tpot_ms'] / best_tpot:.2f}x"
            logits = "(the reference)" if r["system"] == "eager" else f"{r['logits_db']:.1f}" if "logits_db" in r else "?"
            if r.get("logits_db", WRONG_DB) < WRONG_DB:
                logits += " (wrong output: not a peer)"
            fp32 = f"{r['fp32_db']:.1f}" if "fp32_db" in r else "?"
            lines.append(f"| {fmt} | {r['system']} | {r['ttft_ms']:.1f} | {r['tpot_ms']:.2f} | "
                         f"{r.get('batch', 1) * 1e3 / r['tpot_ms']:.1f} | {r['compile_s']:.1f} | {r['peak_rss_mb']:.0f} | {same} | "
                         f"{logits} | {fp32} | {ratio} | {r.get('caches', '?')} |")
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if quiet:
        return
    print("\n".join(lines))
    try:
        from charts import chart  # benchmarks/charts.py, beside this file

        print(chart(os.path.join(args.out, f"{name}.json")))
    except ImportError as e:  # matplotlib is in the bench extra only
        print(f"no PNG chart: {e}")


def token_agreement(tokens, reference) -> str:
    """"yes", or how many of the greedy tokens equal the reference's; "?" without both."""
    if not tokens or not reference:
        return "?"
    return "yes" if tokens == reference else f"{sum(a == b for a, b in zip(tokens, reference))}/{len(tokens)}"


def _is_zen(system: str) -> bool:  # zen and its variants (zen-a8, zen-nocopies); zentorch is a peer
    return system == "zen" or system.startswith("zen-")


def _versions():
    out = {}
    for mod in ("torch", "torchao", "zentorch", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = "none"
    return out


if __name__ == "__main__":
    main()
