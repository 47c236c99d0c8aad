"""Every system in one process, their generations interleaved: the ratios with the drift cancelled.

    python benchmarks/interleaved.py [--model llama1b-4l] [--formats bf16,int4wo,...]
                                     [--systems inductor,zentorch,zen,recipe] [--rounds 6]

On this shared VM the memory bandwidth a process sees moves by up to 2x within minutes (the same
bf16 decode ran at 15 and at 24 ms a token in one process), so systems timed in turn, one process
each (``e2e.py``), compare different machines as often as different systems. Here one process per
format builds and compiles a model for every system, then runs rounds in which each system
generates once, back to back, in alternating order: a change of the machine's state reaches every
system in the same round. TTFT and TPOT are medians over rounds, and each round's ratio of zen to
the best peer is kept, so the table shows how steady the ratio is. Compile time and peak RSS need a
process of their own each: they stay in ``e2e.py``.

Each system's model gets a ``forward`` on a code object of its own, so each has its own Dynamo
cache entries (and recompile limit) rather than four systems' graphs behind one code object's
guards. Compiling leaves global state behind: the recipe sets Inductor's flags as its users do,
and ``backend="zentorch"`` leaves its joint pass in ``torch._inductor.config.joint_custom_post_pass``,
where every later stock-Inductor compile in the process runs it (the recipe, compiled after
zentorch, came out with zentorch's int4 TTFT, 358 ms, against 165 in a process of its own).
Inductor's config is restored after each system has compiled all its graphs (the warm-up runs
prefill and decode twice).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types

from zen_inductor.cpu import describe as describe_cpu  # noqa: E402
from e2e import MODELS, _is_zen, _versions, build, compiled_forward, quant_config, run_arguments, token_agreement

SYSTEMS = ("inductor", "zentorch", "zen", "recipe")  # eager is far behind in every quantized format


def own_forward(model):
    """``model.forward`` on a copy of its code object, so Dynamo keeps this model's compiled code apart."""
    f = type(model).forward
    g = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    g.__kwdefaults__, g.__dict__ = f.__kwdefaults__, dict(f.__dict__)
    return types.MethodType(g, model)


def one_format(args) -> dict:
    """Child process: every system on one format, ``args.rounds`` interleaved rounds."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from zen_inductor.demo import generate

    spec = MODELS[args.model]
    torch.manual_seed(1)
    prompt = torch.randint(0, spec["vocab"], (1, args.prompt))
    forwards = {}
    with torch.no_grad():
        for system in args.systems.split(","):
            clean = torch._inductor.config.get_config_copy()
            model = build(spec)
            cfg = quant_config(args.format)
            if cfg is not None:
                from torchao.quantization import quantize_

                quantize_(model, cfg)
            model.forward = own_forward(model)
            forward = compiled_forward(model, system)
            t0 = time.perf_counter()
            for _ in range(2):
                generate(forward, prompt, 4)
            forwards[system] = forward
            torch._inductor.config.load_config(clean)
            print(f"[{args.format}] {system} compiled and warm in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        systems = list(forwards)
        rounds = []
        for r in range(args.rounds):
            row = {}
            for system in systems if r % 2 == 0 else reversed(systems):
                tokens, ttft, steps = generate(forwards[system], prompt, args.new)
                row[system] = {"ttft_ms": ttft * 1e3, "tpot_ms": statistics.median(steps) * 1e3, "tokens": tokens.tolist()[0]}
            rounds.append(row)
            print(f"[{args.format}] round {r}: " + "  ".join(f"{s} {v['ttft_ms']:.1f}/{v['tpot_ms']:.2f}" for s, v in row.items()),
                  file=sys.stderr, flush=True)
    return {"format": args.format, "systems": systems, "rounds": rounds}


def summarize(run: dict) -> dict:
    """Medians per system, and zen's per-round ratios to the best peer of that round."""
    systems, rounds = run["systems"], run["rounds"]
    med = {s: {k: statistics.median(r[s][k] for r in rounds) for k in ("ttft_ms", "tpot_ms")} for s in systems}
    peers = [s for s in systems if not _is_zen(s)]
    ratios = {}
    for z in (s for s in systems if _is_zen(s)):
        if peers:
            ratios[z] = {k: sorted(r[z][k] / min(r[p][k] for p in peers) for r in rounds) for k in ("ttft_ms", "tpot_ms")}
    return {"median": med, "ratios": ratios}


def write(runs: list, args) -> str:
    os.makedirs(args.out, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d")
    meta = {"date": stamp, "cpu": describe_cpu(), "threads": os.cpu_count(), "model": args.model, "prompt": args.prompt,
            "new": args.new, "rounds": args.rounds, "versions": _versions()}
    with open(os.path.join(args.out, f"interleaved-{args.model}.json"), "w") as f:
        json.dump({"meta": meta, "runs": runs}, f, indent=1)
    lines = [f"# interleaved: {args.model}, prompt {args.prompt}, {args.new} new tokens, batch 1, greedy ({stamp})", "",
             f"Machine: {meta['cpu']}, {meta['threads']} cores. Versions: {meta['versions']}.", "",
             f"One process per format; {args.rounds} rounds, each system generating once per round, back to back.",
             "Medians over rounds; zen's ratio to the best peer is taken per round (median, and min-max over rounds).", "",
             "| format | system | TTFT ms | TPOT ms | tokens = zen's | zen / best peer TTFT | zen / best peer TPOT |",
             "|---|---|---|---|---|---|---|"]
    for run in runs:
        if "error" in run:
            lines.append(f"| {run['format']} | all | failed: {run['error'][:80]} | | | | |")
            continue
        s = summarize(run)
        last = run["rounds"][-1]
        zen_tokens = next((last[z]["tokens"] for z in run["systems"] if _is_zen(z)), None)
        for system in run["systems"]:
            m = s["median"][system]
            same = token_agreement(last[system]["tokens"], zen_tokens)
            cells = ["", ""]
            if system in s["ratios"]:
                cells = [f"{statistics.median(v):.2f}x ({v[0]:.2f}-{v[-1]:.2f})" for v in s["ratios"][system].values()]
            lines.append(f"| {run['format']} | {system} | {m['ttft_ms']:.1f} | {m['tpot_ms']:.2f} | {same} | {cells[0]} | {cells[1]} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, f"interleaved-{args.model}.md"), "w") as f:
        f.write(text)
    return text


def main():
    p = run_arguments(SYSTEMS)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--child", metavar="FORMAT", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.format = args.child
        print("RESULT " + json.dumps(one_format(args)), flush=True)
        return
    runs = []
    for fmt in args.formats.split(","):
        print(f"[{fmt}] {args.systems} in one process, {args.rounds} rounds...", flush=True)
        cmd = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--systems", args.systems,
               "--prompt", str(args.prompt), "--new", str(args.new), "--rounds", str(args.rounds), "--child", fmt]
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # the child's progress goes to our stderr
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        runs.append(json.loads(line[7:]) if line else {"format": fmt, "error": f"child exited with {out.returncode}"})
        write(runs, args)
    print(write(runs, args))


if __name__ == "__main__":
    main()
