"""Every benchmark of the issue in one command: end to end, compile time and per linear, per model.

    python benchmarks/run_all.py [--models llama1b-4l,qwen3-4l] [--only e2e,interleaved,compile,linears]
                                 [--formats ...] [--systems ...] [--reps 3]

Runs the scripts beside this one, one after the other (never two at once: they time the same
two cores), passing the subset flags on; each prints its progress and writes its tables (and the
e2e PNG charts) under ``benchmarks/results/``. A failed step is reported and the rest still run.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = ("e2e", "interleaved", "compile", "linears")
SCRIPTS = {"e2e": "e2e.py", "interleaved": "interleaved.py", "compile": "compile_time.py", "linears": "linears.py"}


def commands(args) -> list[tuple[str, list[str]]]:
    out = []
    for model in args.models.split(","):
        for step in args.only.split(","):
            cmd = [sys.executable, os.path.join(HERE, SCRIPTS[step]),
                   "--model", model, "--out", args.out]
            if args.formats:  # each script has its own default formats: only a given list overrides them
                cmd += ["--formats", args.formats if step != "linears" else ",".join(f for f in args.formats.split(",") if f != "da8w4")]
            if args.systems and step != "linears":
                cmd += ["--systems", args.systems]
            if step == "e2e":
                cmd += ["--reps", str(args.reps)]
            out.append((f"{step} {model}", cmd))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="llama1b-4l,qwen3-4l")
    p.add_argument("--only", default=",".join(STEPS), help="steps to run, of " + ",".join(STEPS))
    p.add_argument("--formats", default="", help="formats for every step (default: each script's own)")
    p.add_argument("--systems", default="", help="systems for e2e and compile (default: each script's own)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args()
    unknown = set(args.only.split(",")) - set(STEPS)
    if unknown:
        p.error(f"unknown steps {sorted(unknown)}; choose from {','.join(STEPS)}")
    todo = commands(args)
    failed = []
    for i, (name, cmd) in enumerate(todo, 1):
        print(f"=== [{i}/{len(todo)}] {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        if subprocess.run(cmd).returncode != 0:
            failed.append(name)
        print(f"=== [{i}/{len(todo)}] {name}: {'failed' if name in failed else 'done'} in {time.perf_counter() - t0:.0f} s", flush=True)
    if failed:
        print("failed: " + ", ".join(failed))
        sys.exit(1)


if __name__ == "__main__":
    main()
