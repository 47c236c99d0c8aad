"""What per-bin tuning buys: winners per M bin against the best single fixed kernel, from the cache.

    python benchmarks/tuning_report.py [CACHE_DIR]     # default: zen_inductor.config.cache_dir

"Best fixed" is the one kernel with the least total time over all bins (what a tuner without
bins, tuned once, could at best have picked). Speedup = its time / the bin winner's time.
"""
import collections
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from zen_inductor import config  # noqa: E402

BIN_ORDER = ["1", "2-4", "5-16", "17-64", "65-256", "257-1024", "1025+"]


def main():
    path = os.path.join(sys.argv[1] if len(sys.argv) > 1 else config.cache_dir, "autotune.json")
    with open(path) as f:
        entries = json.load(f)["entries"]
    shapes = collections.defaultdict(dict)
    for key, entry in entries.items():
        _, kind, n, k, bin_, _ = key.split("|")
        if entry.get("times_us"):
            shapes[(kind, n, k)][bin_.split("=")[1]] = entry
    lines = ["| linear | M bin | winner | winner us | best fixed kernel | its us | speedup |", "|---|---|---|---|---|---|---|"]
    for (kind, n, k), bins in sorted(shapes.items()):
        kernels = set.intersection(*(set(e["times_us"]) for e in bins.values()))
        if not kernels:
            continue
        fixed = min(kernels, key=lambda name: sum(e["times_us"][name] for e in bins.values()))
        for b in sorted(bins, key=lambda b: BIN_ORDER.index(b) if b in BIN_ORDER else 99):
            e = bins[b]
            win = e["times_us"][e["winner"]]
            lines.append(f"| {kind} {n} {k} | {b} | {e['winner']} | {win:.0f} | {fixed} | {e['times_us'][fixed]:.0f} | {e['times_us'][fixed] / win:.2f}x |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
