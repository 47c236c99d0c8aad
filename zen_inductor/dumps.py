"""Pattern-debug dumps: what matched, what nearly matched and why not, which kernel won.

Per compiled graph, when ``config.debug_dir`` (``ZEN_INDUCTOR_DEBUG_DIR``) is set::

    DIR/<graph>/before.py    graph handed to our passes, each node with its model source line
    DIR/<graph>/after.py     the same graph after our rewrites
    DIR/<graph>/report.json  {"matches": [...], "near_misses": [...], "autotune": [...]}

and always one INFO line on the ``zen_inductor`` logger.
"""
from __future__ import annotations

import collections
import json
import logging
import os
from typing import Optional

from . import config
from .record import CompileRecord

log = logging.getLogger("zen_inductor")

# The most recent records, for tests and ``python -m zen_inductor explain`` in-process.
_RECENT: collections.deque = collections.deque(maxlen=64)


def finish(record: CompileRecord) -> None:
    _RECENT.append(record)
    if config.debug_dir:
        record.dump_dir = write(record, config.debug_dir)
    log.info(summary(record))


def recent_records() -> list[CompileRecord]:
    return list(_RECENT)


def write(record: CompileRecord, root: str) -> str:
    folder = os.path.join(root, f"{os.getpid()}_{record.graph_name}")
    os.makedirs(folder, exist_ok=True)
    for name, text in (("before.py", record.graph_before), ("after.py", record.graph_after)):
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    with open(os.path.join(folder, "report.json"), "w") as f:
        json.dump(record.report(), f, indent=2)
    with open(os.path.join(root, "LATEST"), "w") as f:
        f.write(folder)
    return folder


def summary(record: CompileRecord) -> str:
    counts = collections.Counter(m.pattern for m in record.matches)
    parts = ", ".join(f"{n} {p}" for p, n in counts.items()) or "no matches"
    text = f"zen: {parts}; {len(record.near_misses)} near misses"
    if record.dump_dir:
        text += f" (see {record.dump_dir}/report.json)"
    if not record.frozen:
        text += "; weights not frozen"
    return text


def load_report(path: Optional[str] = None) -> dict:
    """A report.json by folder or file; by default the latest under ``config.debug_dir``."""
    if path is None:
        if not config.debug_dir:
            raise FileNotFoundError("no report given and ZEN_INDUCTOR_DEBUG_DIR is not set")
        with open(os.path.join(config.debug_dir, "LATEST")) as f:
            path = f.read().strip()
    if os.path.isdir(path):
        path = os.path.join(path, "report.json")
    with open(path) as f:
        return json.load(f)


def format_report(report: dict) -> str:
    """The report as plain-text tables."""
    lines = [f"graph {report.get('graph', '?')}  (weights {'frozen' if report.get('frozen') else 'NOT frozen'})", ""]
    lines.append("MATCHES")
    rows = [("pattern", "variant", "source", "kernel by M bin")]
    for m in report["matches"]:
        rows.append((m["pattern"], m["variant"], m["source"], _bin_ranges(m["kernels"])))
    lines += _table(rows)
    lines += ["", "NEAR MISSES"]
    rows = [("pattern", "source", "reason")] + [(n["pattern"], n["source"], n["reason"]) for n in report["near_misses"]]
    lines += _table(rows)
    if report.get("autotune"):
        lines += ["", "AUTOTUNE (median us per call; x = excluded)"]
        for entry in report["autotune"]:
            if "bins" not in entry:  # one choice for every M (add_rmsnorm's): no shape, no bins
                cells = [f"x {k}: {v}" for k, v in entry.get("excluded", {}).items()]
                lines.append(f"  {entry['kind']}  {entry['source']}\n    winner {entry['winner']}  {'; '.join(cells)}")
                continue
            lines.append(f"  {entry['kind']} N={entry['n']} K={entry['k']}  {entry['source']}")
            for b in entry["bins"]:
                cells = [f"{k}={v}" for k, v in b["times_us"].items()]
                cells += [f"x {k}: {v}" for k, v in b["excluded"].items()]
                cost = f"[{b['seconds']:.2f} s] " if "seconds" in b else ""
                lines.append(f"    M {b['bin']:>6}: winner {b['winner']:<20} {cost}{'(cached) ' if b['cached'] else ''}{'; '.join(cells)}")
    return "\n".join(lines)


def _table(rows) -> list[str]:
    if len(rows) == 1:
        return ["  (none)"]
    widths = [min(max(len(str(r[i])) for r in rows), 60) for i in range(len(rows[0]) - 1)]
    out = []
    for r in rows:
        cells = [str(c)[:60].ljust(w) for c, w in zip(r[:-1], widths)] + [str(r[-1])]
        out.append("  " + "  ".join(cells))
    return out


def _bin_ranges(kernels: dict) -> str:
    """{"1": a, "2-4": a, "5-16": b} -> "M 1-4: a | 5-16: b"."""
    runs = []
    for label, kernel in kernels.items():
        lo, _, hi = label.rstrip("+").partition("-")
        hi = "" if label.endswith("+") else (hi or lo)
        if runs and runs[-1][2] == kernel:
            runs[-1][1] = hi
        else:
            runs.append([lo, hi, kernel])
    return " | ".join(f"{lo}+: {k}" if not hi else f"{lo if lo == hi else f'{lo}-{hi}'}: {k}" for lo, hi, k in runs)
