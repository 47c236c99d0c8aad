"""The main job: a small Llama, quantized with torchao, compiled with zen, timed against peers.

    python -m zen_inductor demo [--quant int4wo] [--layers 2] [--prompt 64] [--new 16]

The model is transformers' LlamaForCausalLM built from a config in this file (random weights,
nothing downloaded). Every system runs the same greedy decode loop with a DynamicCache; the
first run of each compiled system compiles (progress is printed), later runs are timed.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

QUANTS = ("int4wo", "int4wo-asym", "int8wo", "int8-intx", "none")
SYSTEMS = ("eager", "inductor", "zen")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quant", choices=QUANTS, default="int4wo", help="torchao weight format (default int4 weight-only, group 128)")
    p.add_argument("--group", type=int, default=128, help="group size of int4 formats")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=16000)
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--new", type=int, default=16, help="generated tokens")
    p.add_argument("--reps", type=int, default=3, help="timed runs per system (median)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma list of " + ",".join(SYSTEMS))


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
        max_position_embeddings=max(256, args.prompt + args.new + 8), tie_word_embeddings=True,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def quant_config(name: str, group: int):
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType

    if name == "none":
        return None
    if name == "int8wo":
        cfg = Int8WeightOnlyConfig()
    elif name == "int8-intx":
        cfg = IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))
    else:
        mapping = MappingType.ASYMMETRIC if name.endswith("asym") else MappingType.SYMMETRIC
        cfg = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group), mapping_type=mapping)
    if hasattr(cfg, "set_inductor_config"):
        cfg.set_inductor_config = False  # quantize_ must not rewrite Inductor's globals for the peers
    return cfg


def quantize(model, name: str, group: int):
    cfg = quant_config(name, group)
    if cfg is not None:
        from torchao.quantization import quantize_

        # lm_head stays bf16 (tied to the embedding); every decoder linear is quantized
        quantize_(model, cfg, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "lm_head" not in fqn)
    return model


@torch.no_grad()
def generate(forward, input_ids, new_tokens: int):
    """Greedy decode; returns tokens, time to first token and per-token decode times (s)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    t0 = time.perf_counter()
    # logits of the last position only, as transformers' generate() asks for them
    out = forward(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)
    ttft = time.perf_counter() - t0
    tokens, steps = [token], []
    for _ in range(new_tokens - 1):
        t0 = time.perf_counter()
        out = forward(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        steps.append(time.perf_counter() - t0)
        tokens.append(token)
    return torch.cat(tokens, 1), ttft, steps


@torch.no_grad()
def prefill_logits(forward, input_ids):
    from transformers import DynamicCache

    return forward(input_ids=input_ids, past_key_values=DynamicCache(), use_cache=True).logits.float()


def fp32_reference(model):
    """The same model with every quantized weight dequantized into an fp32 nn.Linear."""
    import copy

    ref = copy.deepcopy(model)
    for module in ref.modules():
        if isinstance(module, torch.nn.Linear):
            w = module.weight
            w = w.dequantize() if hasattr(w, "dequantize") and type(w) is not torch.nn.Parameter else w
            module.weight = torch.nn.Parameter(w.detach().float(), requires_grad=False)
    return ref.float()


def _compile(model, system: str):
    if system == "eager":
        return model.forward
    torch._dynamo.reset()  # one model per system: stay clear of Dynamo's recompile limit
    return torch.compile(model.forward, backend="zen" if system == "zen" else "inductor")


def run(args) -> int:
    import zen_inductor
    from zen_inductor.autotune import sqnr_db

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model: Llama {args.layers} layers, hidden {args.hidden}, "
          f"intermediate {args.intermediate}, vocab {args.vocab}; weights {args.quant}; prompt {args.prompt}, new {args.new}", flush=True)
    model = quantize(build_model(args), args.quant, args.group)
    torch.manual_seed(1)
    prompt = torch.randint(0, args.vocab, (1, args.prompt))
    reference = prefill_logits(fp32_reference(model).forward, prompt)

    rows, eager_tokens, summary = [], None, ""
    for system in [s for s in args.systems.split(",") if s]:
        forward = _compile(model, system)
        zen_inductor.counters.clear()
        t0 = time.perf_counter()
        if system != "eager":
            print(f"[{system}] compiling (first prefill and decode steps)...", flush=True)
        tokens, _, _ = generate(forward, prompt, min(args.new, 4))
        compile_s = time.perf_counter() - t0
        if system != "eager":
            print(f"[{system}] compiled in {compile_s:.1f} s", flush=True)
        if system == "zen":
            summary = ", ".join(f"{v} {k}" for k, v in zen_inductor.counters.items() if "." not in k) or "no matches"
        ttfts, tpots = [], []
        for rep in range(args.reps):
            tokens, ttft, steps = generate(forward, prompt, args.new)
            ttfts.append(ttft)
            tpots.append(statistics.median(steps) if steps else float("nan"))
            print(f"[{system}] run {rep + 1}/{args.reps}: TTFT {ttft * 1e3:.1f} ms, TPOT {tpots[-1] * 1e3:.2f} ms", flush=True)
        logits = prefill_logits(forward, prompt)
        err = (logits - reference).abs().max().item()
        snr = sqnr_db(logits, reference)
        if eager_tokens is None:
            eager_tokens = tokens
        rows.append((system, statistics.median(ttfts) * 1e3, statistics.median(tpots) * 1e3, compile_s,
                     "yes" if torch.equal(tokens, eager_tokens) else f"{int((tokens == eager_tokens).sum())}/{tokens.numel()}", err, snr))

    print()
    print("| system | TTFT ms | TPOT ms | tokens/s | first run s (compile) | tokens = eager | logits vs fp32: max err, SQNR dB |")
    print("|---|---|---|---|---|---|---|")
    for system, ttft, tpot, compile_s, same, err, snr in rows:
        print(f"| {system} | {ttft:.1f} | {tpot:.2f} | {1e3 / tpot:.1f} | {compile_s:.1f} | {same} | {err:.4f}, {snr:.1f} |")
    if summary:
        print(f"\nzen matches: {summary}")
    return 0
