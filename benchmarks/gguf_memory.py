"""Memory of a GGUF model, loaded and compiled: what each system holds against the file's size.

    python benchmarks/gguf_memory.py [--file Q4_1|Q4_0|Q8_0|path.gguf] [--systems transformers,eager,inductor,zen,llamacpp]
                                     [--prompt 128] [--new 8] [--out benchmarks/results]

Every system runs in its own process (RSS is per process), from ``import torch`` to a greedy
generation of ``--new`` tokens after a ``--prompt``-token prompt of the committed text, through a
StaticCache (as benchmarks/smollm2.py). Reported: the process's RSS after ``import torch`` (the
bare baseline), after loading, after compiling and generating (then after ``malloc_trim``, so
memory glibc keeps for reuse is not counted), the peak RSS of the load and of the whole run, and
the bytes of every live CPU tensor (found through the garbage collector) after the run.
``transformers``: transformers' own GGUF load, which dequantizes every tensor to fp32, run eager;
``eager``, ``inductor`` and ``zen``: ``zen_inductor.load_gguf`` (the file's blocks), eager, stock
Inductor with its global freezing flag on, zen; ``zen-aot``: ``zen_inductor.compile_ahead_of_time``
on the file's blocks, its package written to a temporary folder, generating through it;
``zen-aot-loaded`` (after ``zen-aot``): a fresh process that only loads that package
(``zen_inductor.load_ahead_of_time``: no model code, no compile) and generates, as a server
would; ``llamacpp``: llama-cpp-python, where installed
(its process has imported torch too, as this script's children do, so every baseline is the same).
ZEN_BENCH_LLAMACPP_EXTRA_BUFTS=0 as in benchmarks/smollm2.py.
Writes ``gguf-memory-<file>.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
SYSTEMS = ("transformers", "eager", "inductor", "zen", "zen-aot", "zen-aot-loaded", "llamacpp")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def trimmed_rss_mb() -> float:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_mb()


def torch_child(system: str, path: str, prompt: list, new: int) -> dict:
    import torch

    out = {"bare_mb": rss_mb()}
    from smollm2 import compiled_forward
    from transformers import AutoModelForCausalLM, StaticCache

    import zen_inductor

    t0 = time.perf_counter()
    if system == "transformers":
        folder, name = os.path.split(path)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    else:
        model, _ = zen_inductor.load_gguf(path)
    gc.collect()
    out.update(load_s=time.perf_counter() - t0, loaded_mb=rss_mb(), load_peak_mb=peak_mb())
    forward = compiled_forward(model, system if system != "transformers" else "eager")
    ids, length = torch.tensor([prompt]), len(prompt)
    t0 = time.perf_counter()
    with torch.no_grad():
        cache = StaticCache(config=model.config, max_cache_len=length + new)
        logits = forward(input_ids=ids, past_key_values=cache, cache_position=torch.arange(length), logits_to_keep=1).logits
        tokens = [int(logits[0, -1].argmax())]
        for i in range(new - 1):
            logits = forward(input_ids=torch.tensor([tokens[-1:]]), past_key_values=cache,
                             cache_position=torch.tensor([length + i]), logits_to_keep=1).logits
            tokens.append(int(logits[0, -1].argmax()))
    return after_run(out, t0, tokens)


def after_run(out: dict, started: float, tokens: list) -> dict:
    """What every torch child reports once it generated: time, RSS (then trimmed), peak, live tensors."""
    from memory import live_storages

    out.update(run_s=time.perf_counter() - started, run_mb=rss_mb(), trimmed_mb=trimmed_rss_mb(), peak_mb=peak_mb(),
               tokens=tokens, tensors_mb=sum(live_storages().values()) / 2**20)
    return out


def aot_child(system: str, path: str, prompt: list, new: int, package: str) -> dict:
    """zen-aot: compile the package in this process; zen-aot-loaded: load the one zen-aot wrote."""
    import torch

    out = {"bare_mb": rss_mb()}
    import zen_inductor

    t0 = time.perf_counter()
    if system == "zen-aot":
        model, _ = zen_inductor.load_gguf(path)
        gc.collect()
        out.update(loaded_mb=rss_mb(), load_peak_mb=peak_mb())
        generator = zen_inductor.compile_ahead_of_time(model, max_cache_len=len(prompt) + new, package_dir=package)
    else:
        generator = zen_inductor.load_ahead_of_time(package)
        out.update(loaded_mb=rss_mb(), load_peak_mb=peak_mb())
    out["load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    return after_run(out, t0, generator.generate(torch.tensor([prompt]), new)[0, len(prompt):].tolist())


def llamacpp_child(path: str, prompt: list, new: int) -> dict:
    out = {"bare_mb": rss_mb()}
    import llama_cpp
    from smollm2 import llamacpp_extra_bufts

    out["extra_bufts"] = llamacpp_extra_bufts()
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=path, n_ctx=len(prompt) + new + 8, n_threads=os.cpu_count(),
                          n_threads_batch=os.cpu_count(), verbose=False)
    out.update(load_s=time.perf_counter() - t0, loaded_mb=rss_mb(), load_peak_mb=peak_mb())
    t0 = time.perf_counter()
    llm.eval(prompt)
    tokens = [llm.sample(temp=0.0)]
    for _ in range(new - 1):
        llm.eval(tokens[-1:])
        tokens.append(llm.sample(temp=0.0))
    out.update(run_s=time.perf_counter() - t0, run_mb=rss_mb(), trimmed_mb=trimmed_rss_mb(), peak_mb=peak_mb(),
               tokens=tokens, tensors_mb=None)
    return out


def main() -> None:
    from smollm2 import prose_ids
    from zen_inductor.cpu import describe as describe_cpu

    from zen_inductor.smollm2 import gguf_path

    p = argparse.ArgumentParser()
    p.add_argument("--file", default="Q4_1")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=8)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--package", help=argparse.SUPPRESS)
    args = p.parse_args()
    path = args.file if args.file.endswith(".gguf") else gguf_path(args.file)
    if args.child:
        prompt = json.loads(sys.stdin.read())
        if args.child == "llamacpp":
            result = llamacpp_child(path, prompt, args.new)
        elif args.child.startswith("zen-aot"):
            result = aot_child(args.child, path, prompt, args.new, args.package)
        else:
            result = torch_child(args.child, path, prompt, args.new)
        print("RESULT " + json.dumps(result), flush=True)
        return
    prompt = prose_ids(path)[: args.prompt]
    file_mb = os.path.getsize(path) / 2**20
    rows = []
    package = tempfile.mkdtemp(prefix="zen-aot-memory-")  # zen-aot writes it, zen-aot-loaded reads it
    for system in args.systems.split(","):
        needs = {"llamacpp": "llama_cpp", "transformers": "accelerate"}.get(system)
        if needs and importlib.util.find_spec(needs) is None:
            print(f"{system}: {needs} is not installed, skipped", flush=True)
            continue
        done = subprocess.run([sys.executable, __file__, "--child", system, "--file", path, "--new", str(args.new),
                               "--package", package],
                              input=json.dumps(prompt), capture_output=True, text=True)
        line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{system} failed:\n{done.stderr[-3000:]}")
        row = {"system": system, **json.loads(line[len("RESULT "):])}
        row["held_x_file"] = (row["trimmed_mb"] - row["bare_mb"]) / file_mb
        rows.append(row)
        print(f"{system}: bare {row['bare_mb']:.0f} MB, loaded {row['loaded_mb']:.0f} (peak {row['load_peak_mb']:.0f}), "
              f"after the run {row['trimmed_mb']:.0f} (peak {row['peak_mb']:.0f}); held above bare "
              f"{row['trimmed_mb'] - row['bare_mb']:.0f} MB = {row['held_x_file']:.2f}x the file", flush=True)
    name = os.path.basename(path)
    lines = [f"# GGUF memory: {name} ({file_mb:.1f} MB)", "",
             f"Machine: {describe_cpu()}, {os.cpu_count()} cores. Prompt {len(prompt)} tokens of benchmarks/data/prose.txt, "
             f"{args.new} new tokens. One process per system; `python benchmarks/gguf_memory.py --file {args.file}`.", "",
             "RSS in MB. bare: after `import torch`; held: RSS after the run and "
             "`malloc_trim` minus bare; tensors: every live CPU tensor's bytes after the run.", "",
             "| system | bare | loaded | load peak | after run | run peak | held | held / file | tensors | same tokens as eager |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    eager = next((r["tokens"] for r in rows if r["system"] == "eager"), None)
    for r in rows:
        tensors = f"{r['tensors_mb']:.0f}" if r["tensors_mb"] is not None else "-"
        same = "-" if eager is None else ("yes" if r["tokens"] == eager else "no")
        lines.append(f"| {r['system']} | {r['bare_mb']:.0f} | {r['loaded_mb']:.0f} | {r['load_peak_mb']:.0f} | "
                     f"{r['trimmed_mb']:.0f} | {r['peak_mb']:.0f} | {r['trimmed_mb'] - r['bare_mb']:.0f} | "
                     f"{r['held_x_file']:.2f}x | {tensors} | {same} |")
    stem = os.path.join(args.out, f"gguf-memory-{name.removesuffix('.gguf')}")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(stem + ".json", "w") as f:
        json.dump({"file": name, "file_mb": file_mb, "cpu": describe_cpu(), "rows": rows}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
