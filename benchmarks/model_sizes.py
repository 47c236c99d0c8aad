"""How compile time and memory grow with the model: Llama-shaped models of 1B, 3B and 8B.

    python benchmarks/model_sizes.py [--sizes 1b,3b,8b] [--formats int4wo,int8dq] [--systems recipe,inductor,zen]
                                     [--prompt 128] [--new 8] [--caches found|new-model|first-use] [--warm]
                                     [--isa native|avx2] [--out benchmarks/results] [--name model-sizes]

Random weights in Llama 3.2 1B / 3B and Llama 3.1 8B shapes (vocab 128256; tied embeddings for 1B
and 3B). The whole bf16 model is never held: it is built on the meta device, then each part is
materialized, filled and quantized with torchao before the next (as a user with a big model
can do with ``quantize_`` per module). Every (size, format, system) runs in its own process;
each reports the RSS of the quantized model before compiling, the first generate() call (prefill
and decode graphs compiled: the compile time), the peak RSS from the end of the build on (where
Linux can reset it, else the whole process's: ``ru_maxrss``),
the RSS after compiling (``malloc_trim`` first), what of it is tensors the compile added (packed
weights, folded constants: live tensors whose storage did not exist before it) and what is neither
the model nor those (code, libraries, heap kept), TTFT and TPOT over ``--new`` tokens, and how far
the compiled model's logits (prompt and one step) are from eager's in the same process: a system
whose output is wrong is not counted as a peer.
Systems as in e2e.py: stock Inductor and PyTorch's CPU recipe (both with the global freezing flag),
zen, and zen-nocopies (``dequantized_copies=False``: no bf16 copy of a quantized weight for
prefill). ``--caches`` says what the compile finds: the user's caches as found; ``first-use``: empty
Inductor and zen caches (the first compile on a machine: Inductor's ISA probes and zen's kernel
libraries are built in it); ``new-model``: caches where the same system compiled a small model of other
shapes just before, in a process of its own (a new model on a machine used before: nothing of this
model is cached, the machine's one-time builds are). ``--warm`` compiles the model a second time in
the caches the first left (Inductor's FX graph cache, zen's tuning cache: a user's next run). ``--isa avx2`` runs every
system as on an AVX2-only CPU (zen, ATen, Inductor, MKL and oneDNN capped: smollm2.py's ``ISA_AVX2``).
Writes ``<name>.md``, ``.json`` (rows of earlier runs that were not re-run are kept) and ``.png``
(compile time and memory against the model's parameters).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from zen_inductor.cpu import describe as describe_cpu  # noqa: E402
from e2e import (WRONG_DB, _is_zen, _versions, cold_caches, compiled_forward, quant_config, sqnr_db,  # noqa: E402
                 step_logits)
from smollm2 import ISA_AVX2  # noqa: E402

SIZES = {
    "1b": dict(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, head_dim=64, tied=True),
    "3b": dict(hidden=3072, intermediate=8192, layers=28, heads=24, kv_heads=8, head_dim=128, tied=True),
    "8b": dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, head_dim=128, tied=False),
}
VOCAB = 128256
CACHES = {
    "found": "Caches as found.",
    "first-use": "Empty caches for every process (a first compile on the machine).",
    "new-model": ("Every process finds the caches a compile of a small model of other shapes by the same system "
                  "left (a new model on a machine used before: Inductor's ISA probes and zen's kernel libraries "
                  "built, nothing of this model cached)."),
}
# the small model --caches new-model compiles first: shapes none of SIZES has
PRIME = dict(hidden=512, intermediate=1024, layers=1, heads=8, kv_heads=2, head_dim=64, tied=True)
PARAMETERS = {"1b": 1.24, "3b": 3.21, "8b": 8.03}  # billions, the Llama releases of these shapes
COLOURS = {"inductor": "C0", "recipe": "C1", "eager": "C2", "zen": "C3", "zen-nocopies": "C4"}


def start_peak() -> bool:
    """Start the process's peak RSS afresh (Linux resets it on "5" to clear_refs): the build of the
    model is no system's, yet it peaks as high as some compiles (an 8B int8 model's layer-by-layer
    quantization: 13.7-13.8 GB, stock Inductor's compile of it 14.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    """The peak RSS since ``start_peak`` (VmHWM), or the process's (``ru_maxrss``) where unknown."""
    with open("/proc/self/status") as f:
        hwm = next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), None)
    return hwm / 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def tensor_storages() -> dict:
    """(address, bytes) of the storage of every live tensor the garbage collector tracks: a tensor
    subclass's own storage is empty, its parts (codes, scales) are tensors of their own. oneDNN's
    packed weights (stock Inductor's frozen linears) have no storage to ask: their elements count."""
    import torch

    found = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            if obj.is_mkldnn:
                found[("mkldnn", id(obj))] = obj.numel() * obj.element_size()
                continue
            try:
                storage = obj.untyped_storage()
                key = (storage.data_ptr(), storage.nbytes())
            except (NotImplementedError, RuntimeError):  # a wrapper subclass, a fake tensor of a trace
                continue
            if key[0] and key[1]:
                found[key] = key[1]
    return found


def build_quantized(size: str, fmt: str):
    """The model, quantized, one part at a time from the meta device."""
    import torch
    import transformers
    from torchao.quantization import quantize_

    spec = SIZES.get(size, PRIME)
    cfg = transformers.LlamaConfig(
        hidden_size=spec["hidden"], intermediate_size=spec["intermediate"], num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"], head_dim=spec["head_dim"],
        vocab_size=VOCAB, max_position_embeddings=4096, tie_word_embeddings=spec["tied"])
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    quant = quant_config(fmt)
    generator = torch.Generator().manual_seed(0)

    def materialize(module, quantized: bool):
        module.to_empty(device="cpu")
        with torch.no_grad():
            for name, p in module.named_parameters():
                if p.dim() == 1:  # RMSNorm weights
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=generator)
        if quantized and quant is not None:
            quantize_(module, quant)

    model.model.rotary_emb = type(model.model.rotary_emb)(cfg)  # its buffers are computed, not weights
    materialize(model.model.embed_tokens, quantized=False)
    for layer in model.model.layers:
        materialize(layer, quantized=True)
    materialize(model.model.norm, quantized=False)
    if spec["tied"]:  # quantize_ unties it, as on a whole model: the table stays bf16
        model.lm_head.weight = model.model.embed_tokens.weight
        if quant is not None:
            quantize_(model.lm_head, quant)
    else:
        materialize(model.lm_head, quantized=True)
    return model.eval()


def one_run(args) -> dict:
    import torch

    sys.path.insert(0, os.path.dirname(HERE))
    from zen_inductor.demo import generate

    t0 = time.perf_counter()
    model = build_quantized(args.size, args.format)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    out = {"size": args.size, "format": args.format, "system": args.system, "build_s": time.perf_counter() - t0,
           "model_rss_mb": rss_mb(), "build_peak_mb": peak_mb(), "peak_from_build_end": start_peak()}
    torch.manual_seed(1)
    prompt = torch.randint(0, VOCAB, (1, args.prompt))
    with torch.no_grad():
        eager = step_logits(model.forward, prompt)
        before = tensor_storages()
        forward = compiled_forward(model, args.system)
        t0 = time.perf_counter()
        generate(forward, prompt, 3)
        out["compile_s"] = time.perf_counter() - t0
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        out["compiled_rss_mb"] = rss_mb()
        added = sum(n for key, n in tensor_storages().items() if key not in before)
        out["added_tensors_mb"] = added / 2**20
        out["other_mb"] = out["compiled_rss_mb"] - out["model_rss_mb"] - out["added_tensors_mb"]
        tokens, ttft, steps = generate(forward, prompt, args.new)
        compiled = step_logits(forward, prompt)
    out.update(peak_rss_mb=peak_mb(), ttft_ms=ttft * 1e3,
               tpot_ms=statistics.median(steps) * 1e3, tokens=tokens.tolist()[0],
               logits_db=min(sqnr_db(c, e) for c, e in zip(compiled, eager)))
    return out




def run_child(args, size: str, fmt: str, system: str, env) -> dict:
    import subprocess

    cmd = [sys.executable, os.path.abspath(__file__), "--prompt", str(args.prompt), "--new", str(args.new),
           "--child", size, fmt, system]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        if done.returncode == -9:  # SIGKILL: the kernel's OOM killer on these machines
            error = "killed (out of memory)"
        else:
            error = f"exit {done.returncode}: " + (done.stderr.strip().splitlines() or ["?"])[-1][:300]
        return {"size": size, "format": fmt, "system": system, "error": error}
    return json.loads(line[len("RESULT "):])


def measure(args, size: str, fmt: str, system: str) -> dict:
    """One row: the model compiled in the caches ``--caches`` names (a cache root of its own unless
    "found"), after the small model where "new-model", and again in the same caches with ``--warm``."""
    with tempfile.TemporaryDirectory(prefix="zen-sizes-") as root:
        env = {**(dict(os.environ) if args.caches == "found" else cold_caches(root)),
               **(ISA_AVX2 if args.isa == "avx2" else {})}
        if args.caches == "new-model":
            primed = run_child(args, "prime", fmt, system, env)
            if "error" in primed:
                raise SystemExit(f"the small model's compile failed: {primed['error']}")
        row = run_child(args, size, fmt, system, env)
        if args.warm and "error" not in row:
            row["warm_compile_s"] = run_child(args, size, fmt, system, env).get("compile_s", float("nan"))
    return row


def write(rows: list, args) -> None:
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.name}.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)["rows"]
        fresh = {(r["size"], r["format"], r["system"]) for r in rows}
        rows = [r for r in old if (r["size"], r["format"], r["system"]) not in fresh] + rows
    order = {s: i for i, s in enumerate(SIZES)}
    rows.sort(key=lambda r: (order[r["size"]], r["format"], r["system"]))
    meta = {"date": time.strftime("%Y-%m-%d"), "cpu": describe_cpu(), "threads": os.cpu_count(), "versions": _versions(),
            "prompt": args.prompt, "new": args.new, "caches": args.caches, "isa": args.isa}
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [f"# Model sizes: compile time and memory against the model ({meta['date']})", "",
             f"Machine: {meta['cpu']}, {meta['threads']} cores. Versions: {meta['versions']}. Prompt {args.prompt}, "
             f"{args.new} new tokens, batch 1. {CACHES[args.caches]}"
             f"{' Every system as on an AVX2-only CPU (`--isa avx2`: zen, ATen, Inductor, MKL and oneDNN capped at AVX2).' if args.isa == 'avx2' else ''}",
             "",
             "MB of RSS; model: the quantized model before compiling; compiled: after the first generate() (prefill and "
             "decode compiled) and `malloc_trim`, of which added: live tensors the compile made (packed weights, folded "
             "constants), other: neither the model nor those (code, libraries, heap kept); peak: the highest RSS from the "
             "end of the model's build on. "
             f"{'warm s: the same compile again in the caches the first left (Inductor FX graph and zen tuning caches). ' if any('warm_compile_s' in r for r in rows) else ''}"
             "In brackets: zen against the best peer of the row's size and format.", "",
             "| size | format | system | compile s | warm s | model MB | compiled MB | added MB | other MB | peak MB | TTFT ms "
             "| TPOT ms | logits dB vs eager |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['format']} | {r['system']} | {r['error']} | | | | | | | | | |")
            continue
        peers = [p for p in rows if p["size"] == r["size"] and p["format"] == r["format"] and not _is_zen(p["system"])
                 and "error" not in p and p.get("logits_db", WRONG_DB) >= WRONG_DB]

        def cell(key, fmt="{:.0f}"):
            if key not in r:
                return ""
            text = fmt.format(r[key])
            compared = [p for p in peers if key in p and (not key.endswith("compile_s") or p["system"] != "eager")]  # eager compiles nothing
            if _is_zen(r["system"]) and compared:
                text += f" ({r[key] / min(p[key] for p in compared):.2f}x)"
            return text

        logits = f"{r['logits_db']:.1f}" if "logits_db" in r and r["system"] != "eager" else "(the reference)"
        if r.get("logits_db", WRONG_DB) < WRONG_DB:
            logits += " (wrong output: not a peer)"
        lines.append(f"| {r['size']} | {r['format']} | {r['system']} | {cell('compile_s', '{:.1f}')} | {cell('warm_compile_s', '{:.1f}')} | {r['model_rss_mb']:.0f} | "
                     f"{cell('compiled_rss_mb')} | {r.get('added_tensors_mb', float('nan')):.0f} | {r.get('other_mb', float('nan')):.0f} | {cell('peak_rss_mb')} | {cell('ttft_ms', '{:.0f}')} | {cell('tpot_ms', '{:.1f}')} | {logits} |")
    with open(os.path.join(args.out, f"{args.name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[-len(rows) - 2:]), flush=True)
    try:
        chart(rows, meta, os.path.join(args.out, f"{args.name}.png"))
    except ImportError as e:  # matplotlib is in the bench extra only
        print(f"no PNG chart: {e}")


def chart(rows: list, meta: dict, path: str) -> None:
    """Compile time, peak RSS and RSS after compiling against the model's parameters, a line per
    system and format; a run killed out of memory drawn as a cross at the machine's memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    panels = (("compile_s", "compile (first generate), s", 1), ("peak_rss_mb", "peak RSS, GB", 1 / 1024),
              ("compiled_rss_mb", "RSS after compiling, GB", 1 / 1024))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.5))
    lines = dict.fromkeys((r["system"], r["format"]) for r in rows)
    for system, fmt in lines:
        mine = [r for r in rows if (r["system"], r["format"]) == (system, fmt)]
        style = dict(color=COLOURS.get(system, "C5"), linestyle="-" if fmt == "int4wo" else "--")
        for ax, (key, title, scale) in zip(axes, panels):
            done = [(PARAMETERS[r["size"]], r[key] * scale) for r in mine if key in r]
            if done:
                ax.plot(*zip(*done), marker="o", label=f"{system} {fmt}", **style)
            killed = [PARAMETERS[r["size"]] for r in mine if "out of memory" in r.get("error", "")]
            if killed and key != "compile_s":
                ax.plot(killed, [memory_gb] * len(killed), marker="x", markersize=10, linestyle="none", color=style["color"])
            ax.set_title(title)
            ax.set_xlabel("parameters, billions")
            ax.grid(alpha=0.3)
    for fmt in dict.fromkeys(r["format"] for r in rows):  # the model itself, before any compile
        sizes = {r["size"]: r["model_rss_mb"] / 1024 for r in rows if r["format"] == fmt and "model_rss_mb" in r}
        points = sorted((PARAMETERS[size], gb) for size, gb in sizes.items())
        if points:
            axes[2].plot(*zip(*points), color="black", linestyle="-" if fmt == "int4wo" else "--", linewidth=0.8,
                         label=f"the model, {fmt}")
    for ax in axes:
        ax.set_ylim(bottom=0)
    for ax in axes[1:]:
        ax.axhline(memory_gb, color="grey", linewidth=0.8)
    handles = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=6, fontsize=8)
    capped = ", capped at AVX2" if meta.get("isa") == "avx2" else ""
    fig.suptitle(f"Llama shapes, random weights, prompt {meta['prompt']} — {meta['cpu']}{capped}, {meta['threads']} cores, "
                 f"{meta['date']}; x: killed out of memory (grey: the machine's memory)", fontsize=9)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default=",".join(SIZES))
    p.add_argument("--formats", default="int4wo,int8dq")
    p.add_argument("--systems", default="recipe,inductor,zen")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=8)
    p.add_argument("--caches", choices=("found", "new-model", "first-use"), default="found")
    p.add_argument("--warm", action="store_true", help="a second compile in the caches the first left")
    p.add_argument("--isa", choices=("native", "avx2"), default="native")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--name", default="model-sizes", help="the results files' name, without extension")
    p.add_argument("--child", nargs=3, metavar=("SIZE", "FORMAT", "SYSTEM"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.size, args.format, args.system = args.child
        print("RESULT " + json.dumps(one_run(args)), flush=True)
        return
    rows = []
    for size in args.sizes.split(","):
        for fmt in args.formats.split(","):
            for system in args.systems.split(","):
                print(f"[{size} / {fmt} / {system}] running...", flush=True)
                row = measure(args, size, fmt, system)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)
                write(rows, args)


if __name__ == "__main__":
    main()
