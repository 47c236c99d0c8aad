"""Compile time, cold and warm: zen against stock Inductor on the same model, with its own caches.

    python benchmarks/compile_time.py [--model llama1b-4l] [--formats bf16,int4wo,int8wo] [--systems inductor,zen]
                                      [--runs 3]

For each (format, system) ``--runs`` processes compile the model in turn with a private cache
root: the first finds Inductor's FX graph cache (and zen's tuning cache) empty, each later one
finds what the earlier left, as a user's next runs do. (A zen compile whose tuning budget ran out
tunes the rest in the next run, whose graph then differs: its FX graph cache hits from the run
after.) Rounds alternate the order of systems so drift spreads over both. Compile time is the
first generate() call of e2e.py (prefill and the decode graphs).
Writes ``benchmarks/results/compile-<model>.md``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from zen_inductor.cpu import describe as describe_cpu  # noqa: E402
from e2e import MODELS, _versions, cold_caches, run_child  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama1b-4l", choices=sorted(MODELS))
    p.add_argument("--formats", default="bf16,int4wo,int8wo")
    p.add_argument("--systems", default="inductor,zen")
    p.add_argument("--runs", type=int, default=3, help="compiles per (format, system), the first with empty caches")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args()
    args.phases = ["cold"] + [f"run {i}" for i in range(2, args.runs + 1)]
    systems = args.systems.split(",")
    rows = []
    for fmt in args.formats.split(","):
        roots = {s: tempfile.mkdtemp(prefix=f"zen-compile-{s}-") for s in systems}
        times: dict = {s: {} for s in systems}
        for i, phase in enumerate(args.phases):
            for system in systems if i % 2 == 0 else reversed(systems):
                child = argparse.Namespace(model=args.model, prompt=128, new=4, reps=1, cache="dynamic", batch=1)
                r = run_child(child, fmt, system, env=cold_caches(roots[system]))
                times[system][phase] = r
                shown = f"{r['compile_s']:.1f} s ({r['caches']})" if "compile_s" in r else f"failed: {r['error']}"
                print(f"[{fmt} / {system} / {phase}] {shown}", flush=True)
        for system in systems:
            shutil.rmtree(roots[system], ignore_errors=True)  # Inductor's and zen's caches of this format
            rows.append({"format": fmt, "system": system, **{phase: times[system][phase] for phase in args.phases}})
    write(rows, args)


def write(rows, args):
    stamp = time.strftime("%Y-%m-%d")
    phases = args.phases
    lines = [f"# compile time: {args.model}, from empty caches to warm ({stamp})", "",
             f"Machine: {describe_cpu()}, {os.cpu_count()} cores. Versions: {_versions()}.", "",
             "cold: empty Inductor FX graph cache and empty zen tuning cache; run n: a new process with the caches "
             "the earlier runs left. Seconds of the first generate() call (all graphs of the model); "
             "in brackets zen / stock Inductor.", "",
             "| format | system | " + " | ".join(f"{p} s" for p in phases) + " | caches (last run) |",
             "|---|---|" + "---|" * len(phases) + "---|"]
    for r in rows:
        stock = next((s for s in rows if s["format"] == r["format"] and s["system"] == "inductor"), None)
        cells = []
        for phase in phases:
            a = r[phase].get("compile_s")
            cell = f"{a:.1f}" if a is not None else "failed"
            b = stock[phase].get("compile_s") if stock else None
            if r["system"].startswith("zen") and a and b:
                cell += f" ({a / b:.2f}x)"
            cells.append(cell)
        lines.append(f"| {r['format']} | {r['system']} | " + " | ".join(cells) + f" | {r[phases[-1]].get('caches', '')} |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"compile-{args.model}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
