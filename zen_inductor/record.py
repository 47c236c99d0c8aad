"""What our passes did to one compiled graph: matches, near misses, kernel choices.

Patterns append here; ``dumps`` turns it into files and the log summary; tests read it through
``zen_inductor.counters`` and ``last_report()``.
"""
from __future__ import annotations

import collections
import re
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch.fx as fx


class PatternMiss(Exception):
    """Raised by a pattern's check: the message is the reason of the ``NearMiss`` recorded for
    users, and the graph is left as it was."""


class NoKernel(PatternMiss):
    """No kernel can run a linear here (each candidate's reason in the message)."""

# Process-wide match counts, as ``torch._dynamo.utils.counters["inductor"]``: tests assert on them.
counters: collections.Counter = collections.Counter()


@dataclass
class Match:
    pattern: str
    variant: str
    source: str
    replacement: str
    kernels: dict = field(default_factory=dict)  # bin label -> kernel name


@dataclass
class NearMiss:
    pattern: str
    source: str
    reason: str


@dataclass
class CompileRecord:
    graph_name: str
    matches: list = field(default_factory=list)
    near_misses: list = field(default_factory=list)
    autotune: list = field(default_factory=list)
    graph_before: str = ""  # both rendered only when dumps are written (config.debug_dir)
    graph_after: str = ""
    frozen: bool = True
    dump_dir: Optional[str] = None

    def match(self, pattern: str, variant: str, node: fx.Node, replacement: str, kernels=None) -> Match:
        m = Match(pattern, variant, source_line(node), replacement, dict(kernels or {}))
        self.matches.append(m)
        counters[pattern] += 1
        counters[f"{pattern}.{variant}"] += 1
        return m

    def unmatch(self, m: Match) -> None:
        """Take back a match whose replacement could not be completed."""
        self.matches.remove(m)
        counters[m.pattern] -= 1
        counters[f"{m.pattern}.{m.variant}"] -= 1

    def near_miss(self, pattern: str, node: fx.Node, reason: str) -> None:
        self.near_misses.append(NearMiss(pattern, source_line(node), reason))
        counters[f"{pattern}.near_miss"] += 1

    def report(self) -> dict:
        return {
            "graph": self.graph_name,
            "frozen": self.frozen,
            "matches": [asdict(m) for m in self.matches],
            "near_misses": [asdict(n) for n in self.near_misses],
            "autotune": self.autotune,
        }


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')


def source_line(node: fx.Node) -> str:
    """``file:line (function): code`` of the innermost model frame that produced ``node``."""
    trace = node.meta.get("stack_trace") or ""
    frames = _FRAME.findall(trace)
    # the model's own line, not the torch / torchao internals it called into
    model_frames = [f for f in frames if not _LIBRARY.search(f[0])]
    if frames:
        path, line, fn, code = (model_frames or frames)[-1]
        return f"{path.split('site-packages/')[-1]}:{line} ({fn}): {code.strip()}"
    modules = node.meta.get("nn_module_stack")
    if modules:
        path, cls = list(modules.values())[-1]
        path = path.replace("L['self'].", "").replace("L['fn'].", "")
        return f"module {path} ({getattr(cls, '__name__', cls)})"
    return f"<{node.name}: no source>"


_LIBRARY = re.compile(r"site-packages/(torch|torchao)/")
