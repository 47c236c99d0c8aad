"""PNG charts of the end-to-end results: TTFT and TPOT per format, one bar per system.

    python benchmarks/charts.py [benchmarks/results/e2e-llama1b-4l.json ...]

Without arguments, charts every ``e2e-*.json`` under ``benchmarks/results``. Log scale: eager
int4 decode is 30x slower than the rest, and ratios read truly on it.
"""
from __future__ import annotations

import glob
import json
import os
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def chart(path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        data = json.load(f)
    rows = [r for r in data["results"] if "tpot_ms" in r]
    formats = list(dict.fromkeys(r["format"] for r in rows))
    known = ("eager", "inductor", "recipe", "zentorch", "zen", "zen-a8")
    systems = sorted(dict.fromkeys(r["system"] for r in rows), key=lambda s: known.index(s) if s in known else len(known))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(systems)
    for ax, metric, title in ((axes[0], "ttft_ms", "time to first token (ms)"), (axes[1], "tpot_ms", "time per output token (ms)")):
        for i, system in enumerate(systems):
            xs, ys = [], []
            for j, fmt in enumerate(formats):
                r = next((r for r in rows if r["format"] == fmt and r["system"] == system), None)
                if r is not None:
                    xs.append(j + (i - (len(systems) - 1) / 2) * width)
                    ys.append(r[metric])
            ax.bar(xs, ys, width, label=system, color="C3" if system == "zen" else None)
        ax.set_yscale("log")
        ax.set_xticks(range(len(formats)), formats)
        ax.set_title(title)
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[1].legend(fontsize=8)
    meta = data["meta"]
    fig.suptitle(f"{meta['model']}: prompt {meta['prompt']}, {meta['new']} new tokens, batch 1 — {meta['cpu']}, "
                 f"{meta['threads']} cores, {meta['date']} (lower is better)", fontsize=9)
    fig.tight_layout()
    out = os.path.splitext(path)[0] + ".png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(paths=None):
    for path in paths or sorted(glob.glob(os.path.join(RESULTS, "e2e-*.json"))):
        print(chart(path))


if __name__ == "__main__":
    main(sys.argv[1:])
