"""The real model against llama.cpp: SmolLM2-135M-Instruct from its GGUF file, every system on the
same blocks.

    python benchmarks/smollm2.py [--systems eager,inductor,zen,llamacpp] [--prompts 128,512] [--new 64]
                                 [--reps 3] [--file Q4_1|path.gguf] [--out benchmarks/results] [--name STEM]
                                 [--reuse-cache] [--skip-module-guards] [--isa native|avx2] [--rounds N] [--cold]

Every (prompt, system) runs in its own process (compile time and peak RSS are its own). The torch
systems load the file with ``zen_inductor.load_gguf`` (their linears compute with the file's
blocks) and generate greedily through a StaticCache, as transformers' ``generate`` does with
``cache_implementation="static"``; llama.cpp (``llama-cpp-python``, where installed) runs the same
file with the same prompt tokens and thread count, in a process without torch (llama.cpp's
decode crashed with torch loaded beside it). The prompt is the start of the committed
public-domain text ``benchmarks/data/prose.txt``, tokenized once by the parent. Stock Inductor runs
with its global freezing flag on (PyTorch's CPU recipe for inference); zen as a user would call it.
``--merge`` re-runs the given systems and keeps the other rows of the last results.
A system named with ``-kv8`` keeps its KV cache in 8 bits: zen-kv8 generates through
``zen_inductor.Int8StaticCache`` (int8, a scale a KV head and position), llamacpp-kv8 with llama.cpp's
Q8_0 keys and values (blocks of 32, with its flash attention, which a quantized V needs).
zen-kv16 keeps bf16 keys and values beside the fp32 model (``zen_inductor.Bf16StaticCache``): the
bytes of llama.cpp's default f16 cache.
ZEN_BENCH_LLAMACPP_EXTRA_BUFTS=0 turns llama.cpp's extra buffer types off (see llamacpp_run).
--reuse-cache: the torch systems keep one StaticCache and reset it before each generation, as a
server holding its caches does. A fresh cache tells transformers the prompt starts at position 0
and it asks SDPA for ``is_causal``; a reset one is initialized, its length a tensor, and
transformers passes a mask over the whole cache instead (as it does for padding or a cached
prefix): the prompt's attention is then flash attention under a mask.
--skip-module-guards: every compiled torch system is compiled with torch.compile's guard_filter_fn
``torch.compiler.skip_guard_on_all_nn_modules_unsafe``: Dynamo stops checking the model's modules
at each call (~1 ms of a SmolLM2 decode step, the same for every backend), right when nothing
reassigns them during generation, as vLLM drops its guards.
--isa avx2: every system runs the code an AVX2-only CPU would, on this one: zen, ATen, Inductor,
MKL and oneDNN capped at AVX2 (their environment variables, ISA_AVX2 below), a fresh Inductor
cache for it, and llama.cpp from a build without AVX-512 (``bash scripts/llamacpp --avx2``; the
run stops if the llama.cpp it finds reports AVX-512). The memory system stays this machine's.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from zen_inductor.cpu import describe as describe_cpu

HERE = os.path.dirname(os.path.abspath(__file__))
SYSTEMS = ("eager", "inductor", "zen", "zen-kv8", "zen-kv16", "zen-aot", "llamacpp", "llamacpp-kv8")
AOT = "zen-aot"  # zen_inductor.compile_ahead_of_time: AOTInductor programs, no Dynamo or Python wrapper a step
KV8 = "-kv8"
KV16 = "-kv16"
# what caps each library at AVX2 (zen, ATen and Inductor's generated code, MKL, oneDNN)
ISA_AVX2 = {"ZEN_INDUCTOR_CPU_CAPABILITY": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
            "ONEDNN_MAX_CPU_ISA": "AVX2"}


def llamacpp_avx2_build() -> str:
    """Where ``scripts/llamacpp --avx2`` installs llama-cpp-python built without AVX-512."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "zen_inductor", "llamacpp-avx2")


def child_env(isa: str, system: str) -> dict:
    """The environment of a system's process: this one's, capped at ``isa``."""
    env = dict(os.environ)
    if isa == "avx2":
        env.update(ISA_AVX2)
        if system.startswith("llamacpp"):
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [llamacpp_avx2_build(), env.get("PYTHONPATH")]))
        else:
            from torch._inductor.runtime.cache_dir_utils import default_cache_dir

            env.setdefault("TORCHINDUCTOR_CACHE_DIR", default_cache_dir() + "-avx2")
    return env


def prose_ids(path: str) -> list:
    """The committed text in the model's tokens (its tokenizer is in the GGUF file)."""
    import transformers

    folder, name = os.path.split(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    with open(os.path.join(HERE, "data", "prose.txt")) as f:
        return tokenizer(f.read()).input_ids


def compiled_forward(model, system: str, skip_module_guards: bool = False):
    """``model.forward`` as ``system`` runs it: eager, stock Inductor with its global freezing flag
    on (PyTorch's CPU recipe for inference), or zen as a user calls it."""
    import torch

    options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe} if skip_module_guards else {}
    if system == "inductor":
        torch._inductor.config.freezing = True
        return torch.compile(model.forward, backend="inductor", options=options)
    if system == "zen":
        return torch.compile(model.forward, backend="zen", options=options)
    return model.forward


def torch_run(system: str, path: str, prompt: list, new: int, reps: int, reuse_cache: bool = False,
              skip_module_guards: bool = False) -> dict:
    import torch
    from transformers import StaticCache

    import zen_inductor

    t0 = time.perf_counter()
    model, _ = zen_inductor.load_gguf(path)
    load_s = time.perf_counter() - t0
    ids, length = torch.tensor([prompt]), len(prompt)
    forward = compiled_forward(model, system.removesuffix(KV8).removesuffix(KV16), skip_module_guards)
    cache_class = (zen_inductor.Int8StaticCache if system.endswith(KV8) else
                   zen_inductor.Bf16StaticCache if system.endswith(KV16) else StaticCache)
    kept = cache_class(config=model.config, max_cache_len=length + new) if reuse_cache else None

    @torch.no_grad()
    def generate(steps: int):
        if kept is not None:
            kept.reset()
        cache = kept if kept is not None else cache_class(config=model.config, max_cache_len=length + new)
        t = time.perf_counter()
        out = forward(input_ids=ids, past_key_values=cache, cache_position=torch.arange(length), use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        ttft = time.perf_counter() - t
        tokens, times = [int(token)], []
        for i in range(steps - 1):
            t = time.perf_counter()
            out = forward(input_ids=token, past_key_values=cache, cache_position=torch.tensor([length + i]), use_cache=True,
                          logits_to_keep=1)
            token = out.logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - t)
            tokens.append(int(token))
        return tokens, ttft, times

    t0 = time.perf_counter()
    generate(3)  # compiles prefill and decode
    first_s = time.perf_counter() - t0
    runs = [generate(new) for _ in range(reps)]
    return dict(load_s=load_s, first_s=first_s, tokens=runs[-1][0], ttft_ms=statistics.median(r[1] for r in runs) * 1e3,
                tpot_ms=statistics.median(statistics.median(r[2]) for r in runs) * 1e3)


def aot_run(path: str, prompt: list, new: int, reps: int) -> dict:
    """zen ahead of time: the model exported and compiled by AOTInductor with zen's pass, its own
    greedy loop (one call into C++ a token), as llama.cpp has its own."""
    import torch

    import zen_inductor

    t0 = time.perf_counter()
    model, _ = zen_inductor.load_gguf(path)
    load_s = time.perf_counter() - t0
    ids, length = torch.tensor([prompt]), len(prompt)
    t0 = time.perf_counter()
    generator = zen_inductor.compile_ahead_of_time(model, max_cache_len=length + new)

    def generate(steps: int):
        times = []
        out = generator.generate(ids, steps, step_times=times)
        return out[0, length:].tolist(), times[0], times[1:]

    generate(3)
    first_s = time.perf_counter() - t0
    runs = [generate(new) for _ in range(reps)]
    return dict(load_s=load_s, first_s=first_s, tokens=runs[-1][0], ttft_ms=statistics.median(r[1] for r in runs) * 1e3,
                tpot_ms=statistics.median(statistics.median(r[2]) for r in runs) * 1e3,
                export_s=generator.figures.export_s, compile_s=generator.figures.compile_s)


def llamacpp_extra_bufts() -> bool:
    """Whether llama.cpp's extra buffer types stay on; ZEN_BENCH_LLAMACPP_EXTRA_BUFTS=0 turns them off.

    On the AVX-512/AMX Xeon VM here llama.cpp's decode crashed (SIGSEGV in llama_decode) with
    its extra buffer types (weights repacked for the CPU, AMX); llama-cpp-python does not expose
    the switch, so it is set on the default parameters it starts from. Elsewhere they stay on."""
    import llama_cpp.llama

    if os.environ.get("ZEN_BENCH_LLAMACPP_EXTRA_BUFTS", "1") != "0":
        return True
    defaults = llama_cpp.llama.llama_cpp.llama_model_default_params

    def without_extra_bufts():
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama.llama_cpp.llama_model_default_params = without_extra_bufts
    return False


def llamacpp_run(path: str, prompt: list, new: int, reps: int, threads: int, kv8: bool = False) -> dict:
    import llama_cpp

    features = llama_cpp.llama_cpp.llama_print_system_info().decode()
    if os.environ.get("ATEN_CPU_CAPABILITY") == "avx2" and "AVX512" in features:
        raise SystemExit(f"llama.cpp at {llama_cpp.__file__} runs AVX-512 ({features}): build one without it "
                         "with `bash scripts/llamacpp --avx2` for --isa avx2")
    extra_bufts = llamacpp_extra_bufts()
    ids, length = prompt, len(prompt)
    kv = dict(type_k=llama_cpp.GGML_TYPE_Q8_0, type_v=llama_cpp.GGML_TYPE_Q8_0, flash_attn=True) if kv8 else {}
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=path, n_ctx=length + new + 8, n_threads=threads, n_threads_batch=threads, n_batch=512,
                          verbose=False, **kv)
    load_s = time.perf_counter() - t0

    def generate(steps: int):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        token = llm.sample(temp=0.0)
        ttft = time.perf_counter() - t
        tokens, times = [token], []
        for _ in range(steps - 1):
            t = time.perf_counter()
            llm.eval([token])
            token = llm.sample(temp=0.0)
            times.append(time.perf_counter() - t)
            tokens.append(token)
        return tokens, ttft, times

    t0 = time.perf_counter()
    generate(3)
    first_s = time.perf_counter() - t0
    runs = [generate(new) for _ in range(reps)]
    return dict(load_s=load_s, first_s=first_s, tokens=runs[-1][0], ttft_ms=statistics.median(r[1] for r in runs) * 1e3,
                tpot_ms=statistics.median(statistics.median(r[2]) for r in runs) * 1e3, version=llama_cpp.__version__,
                extra_bufts=extra_bufts, features=features)


def child(args) -> None:
    with open(args.ids) as f:
        prompt = json.load(f)
    if args.system == AOT:
        result = aot_run(args.file, prompt, args.new, args.reps)
    elif args.system.startswith("llamacpp"):
        result = llamacpp_run(args.file, prompt, args.new, args.reps, args.threads, kv8=args.system.endswith(KV8))
    else:
        result = torch_run(args.system, args.file, prompt, args.new, args.reps, args.reuse_cache, args.skip_module_guards)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def across_rounds(rows: list) -> dict:
    """One system's processes at one prompt as one row: the medians of their figures (processes
    of one build differ more than runs within one on this shared VM: llama.cpp's TPOT took
    7.1 or 9.0 ms from one process to the next), the last one's tokens."""
    merged = dict(rows[-1])
    for key in ("ttft_ms", "tpot_ms", "first_s", "peak_rss_mb"):
        merged[key] = statistics.median(r[key] for r in rows)
    merged["tpot_rounds"] = sorted(r["tpot_ms"] for r in rows)
    return merged


def paired_ratios(rows: list, system: str = "zen") -> dict:
    """prompt -> ``system``'s TPOT over llama.cpp's in each round both ran: ratios of processes run
    back to back, which the VM's slow drift moves less than the medians of either."""
    out = {}
    for length in sorted({r["prompt"] for r in rows}):
        by_round = {}
        for r in rows:
            if r["prompt"] == length and r["system"] in (system, "llamacpp") and "round" in r:
                by_round.setdefault(r["round"], {})[r["system"]] = r["tpot_ms"]
        ratios = [t[system] / t["llamacpp"] for _, t in sorted(by_round.items()) if len(t) == 2]
        if len(ratios) > 1:
            out[length] = ratios
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--prompts", default="128,512")
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--file", default="Q4_1", help="Q4_1 (the wheel's file) or a path to a GGUF file")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--merge", action="store_true", help="keep the last results' rows of the systems not run")
    p.add_argument("--name", help="the results' file name without its extension (default: smollm2[-FILE])")
    p.add_argument("--reuse-cache", action="store_true", help="one StaticCache a process, reset before each generation")
    p.add_argument("--skip-module-guards", action="store_true",
                   help="compile every torch system with guard_filter_fn skip_guard_on_all_nn_modules_unsafe")
    p.add_argument("--rounds", type=int, default=1, help="processes a system and prompt, interleaved; medians")
    p.add_argument("--cold", action="store_true", help="every process starts with empty Inductor and zen caches")
    p.add_argument("--isa", choices=("native", "avx2"), default="native",
                   help="avx2: every system as on an AVX2-only CPU (see the module's docstring)")
    p.add_argument("--system", help=argparse.SUPPRESS)
    p.add_argument("--ids", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.file == "Q4_1":
        from zen_inductor.smollm2 import gguf_path

        args.file = gguf_path()
    if args.system:
        return child(args)
    import importlib.util

    import torch

    systems = [s for s in args.systems.split(",")
               if s and (not s.startswith("llamacpp") or importlib.util.find_spec("llama_cpp"))]
    name = os.path.basename(args.file)
    default_name = ("smollm2" if name.endswith("Q4_1.gguf") else f"smollm2-{name}") + ("-avx2" if args.isa == "avx2" else "")
    stem = os.path.join(args.out, args.name or default_name)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    if args.merge and os.path.exists(stem + ".json"):
        with open(stem + ".json") as f:
            rows = [r for r in json.load(f) if r["system"] not in systems]
    text = prose_ids(args.file)
    lengths = [int(x) for x in args.prompts.split(",")]
    ids_files = {length: os.path.join(args.out, f".prompt-{length}.json") for length in lengths}
    for length, ids_file in ids_files.items():
        with open(ids_file, "w") as f:  # a prompt longer than the text reads it again from the start
            json.dump((text * -(-length // len(text)))[:length], f)
    for round_ in range(args.rounds):
        for length in lengths:
            for system in systems if round_ % 2 == 0 else systems[::-1]:  # drift spread over every system
                print(f"[round {round_ + 1}, prompt {length}] {system} ...", flush=True)
                cmd = [sys.executable, __file__, "--system", system, "--ids", ids_files[length], "--new", str(args.new),
                       "--reps", str(1 if system == "eager" else args.reps), "--file", args.file,
                       "--threads", str(torch.get_num_threads()), *(["--reuse-cache"] if args.reuse_cache else []),
                       *(["--skip-module-guards"] if args.skip_module_guards else [])]
                env = child_env(args.isa, system)
                with tempfile.TemporaryDirectory(prefix="zen-cold-") as root:
                    if args.cold:  # what a first compile on a fresh machine costs; else caches as found
                        env.update(TORCHINDUCTOR_CACHE_DIR=os.path.join(root, "inductor"),
                                   ZEN_INDUCTOR_CACHE_DIR=os.path.join(root, "zen"))
                    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
                if line is None:
                    print(f"  failed (exit {out.returncode}):", out.stdout[-2000:], out.stderr[-4000:])
                    continue
                row = dict(json.loads(line[7:]), system=system, prompt=length, round=round_)
                print(f"  TTFT {row['ttft_ms']:.1f} ms, TPOT {row['tpot_ms']:.2f} ms, first generate {row['first_s']:.1f} s, "
                      f"peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
                rows.append(row)
    for ids_file in ids_files.values():
        os.remove(ids_file)
    lines = [f"# SmolLM2-135M-Instruct, {name}: zen against llama.cpp and PyTorch ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {describe_cpu()}, {torch.get_num_threads()} threads"
             f"{'; every system as on an AVX2-only CPU (`--isa avx2`: zen, ATen, Inductor, MKL and oneDNN capped at AVX2, llama.cpp built without AVX-512)' if args.isa == 'avx2' else ''}. Batch 1, greedy, {args.new} new tokens, StaticCache "
             f"{'(one a process, reset before each generation: the prompt attends under a mask) ' if args.reuse_cache else ''}"
             f"(`-kv8`: 8-bit keys and values, zen's Int8StaticCache and llama.cpp's Q8_0 cache; `-kv16`: zen's Bf16StaticCache, the bytes of llama.cpp's default f16 cache); "
             f"medians of {args.reps} runs (eager: 1)"
             f"{f' in each of {args.rounds} processes a system and prompt, in alternating order; a row gives their medians, TPOT with its range' if args.rounds > 1 else ''}. "
             f"{'Every torch system compiled with its module guards skipped (`--skip-module-guards`). ' if args.skip_module_guards else ''}"
             f"One process per row{' and round' if args.rounds > 1 else ''}"
             f"{', each with empty Inductor and zen caches (`--cold`)' if args.cold else ''}. Every system computes with the file's blocks. "
             f"Prompts: the first tokens of `benchmarks/data/prose.txt` ({len(text)} tokens), read again from its start "
             f"for longer ones.", "",
             "| prompt | system | TTFT ms | TPOT ms | tokens/s | first generate s (compile) | peak RSS MB | tokens = llama.cpp's | TPOT / zen's |",
             "|---|---|---|---|---|---|---|---|---|"]
    order = {s: i for i, s in enumerate(SYSTEMS)}
    for length in sorted({r["prompt"] for r in rows}):
        group = [across_rounds([r for r in rows if r["prompt"] == length and r["system"] == system])
                 for system in dict.fromkeys(r["system"] for r in rows if r["prompt"] == length)]
        group.sort(key=lambda r: order.get(r["system"], len(order)))
        ref = next((r["tokens"] for r in group if r["system"] == "llamacpp"), None)
        zen = next((r["tpot_ms"] for r in group if r["system"] == "zen"), None)
        for r in group:
            same = "?" if ref is None else ("yes" if r["tokens"] == ref else f"{sum(a == b for a, b in zip(r['tokens'], ref))}/{len(ref)}")
            ratio = f"{r['tpot_ms'] / zen:.2f}x" if zen else ""
            system = r["system"] + (" (no extra buffer types)" if r.get("extra_bufts") is False else "")
            tpots = r["tpot_rounds"]
            tpot = f"{r['tpot_ms']:.2f}" + (f" ({tpots[0]:.2f}-{tpots[-1]:.2f})" if len(tpots) > 1 else "")
            lines.append(f"| {length} | {system} | {r['ttft_ms']:.1f} | {tpot} | {1e3 / r['tpot_ms']:.1f} | "
                         f"{r['first_s']:.1f} | {r['peak_rss_mb']:.0f} | {same} | {ratio} |")
    for system in ("zen", AOT):
        paired = paired_ratios(rows, system)
        if paired:
            lines += ["", f"{system}'s TPOT over llama.cpp's, process by process (adjacent in time, one pair a round): "
                      + "; ".join(f"prompt {length}: {', '.join(f'{r:.2f}' for r in ratios)} (median "
                                  f"{statistics.median(ratios):.2f})" for length, ratios in paired.items()) + "."]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(stem + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
