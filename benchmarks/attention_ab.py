"""Decode attention's C++ at two or more git revisions, side by side in one process: an A/B that the
machine's noise does not swamp (its read bandwidth moved between 42 and 77 GB/s within minutes on
one VM, more than most kernel changes move a call).

Each revision's ``zen_inductor/csrc`` is taken from git (``worktree``: the files as they are), its
AVX2 and AVX-512 builds compiled with g++ -O3 -march=native -fopenmp (Inductor's optimization and
ISA flags; its own build of one source ran at the same speed), and ``attention_ab.cpp`` calls the
builds of one ISA in alternating rounds over ``--caches`` caches of one shape, after checking they
agree. Medians of the rounds.

    python benchmarks/attention_ab.py --revs f2b8a8b,HEAD [--isa avx512|avx2] [--contexts 2048,4096]
                                      [--dtypes bfloat16,float32,int8] [--out FILE]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.decode_attention import table  # noqa: E402
from zen_inductor.cpu import describe as describe_cpu  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CSRC = "zen_inductor/csrc"
KINDS = {"float32": 0, "bfloat16": 1, "int8": 2}
SOURCES = {"avx2": "decode_attention.cpp", "avx512": "decode_attention_avx512.cpp"}
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC"]


def source_names(rev: str) -> list[str]:
    if rev == "worktree":
        return os.listdir(os.path.join(ROOT, CSRC))
    return subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:{CSRC}"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout.split()


def source(rev: str, name: str) -> bytes:
    if rev == "worktree":
        with open(os.path.join(ROOT, CSRC, name), "rb") as f:
            return f.read()
    return subprocess.run(["git", "show", f"{rev}:{CSRC}/{name}"], cwd=ROOT, check=True, capture_output=True).stdout


def export_csrc(rev: str, into: str) -> None:
    """The kernel sources of ``rev`` (or of the working tree) as files in ``into``."""
    os.makedirs(into)
    for name in source_names(rev):
        with open(os.path.join(into, name), "wb") as f:
            f.write(source(rev, name))


def build(rev: str, isa: str, work: str) -> str:
    src = os.path.join(work, re.sub(r"\W", "_", rev))
    if not os.path.isdir(src):
        export_csrc(rev, src)
    lib = os.path.join(src, f"attention_{isa}.so")
    subprocess.run(["g++", *FLAGS, f"-I{src}", os.path.join(src, SOURCES[isa]), "-o", lib], check=True)
    return lib


def run_case(harness: str, libs: list[str], h: int, hkv: int, d: int, context: int, kind: int, args) -> list[float]:
    command = [harness, str(h), str(hkv), str(context), str(d), str(kind), str(args.caches), str(args.rounds), *libs]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return [float(x) for x in re.findall(r"median ([\d.]+) us", out)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--revs", required=True, help="git revisions, comma-separated; 'worktree': the files as they are")
    p.add_argument("--isa", choices=sorted(SOURCES), default="avx512")
    p.add_argument("--contexts", default="2048,4096")
    p.add_argument("--dtypes", default="float32,bfloat16,int8")
    p.add_argument("--caches", type=int, default=30)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", default="")
    args = p.parse_args()
    revs = args.revs.split(",")
    with tempfile.TemporaryDirectory() as work:
        harness = os.path.join(work, "attention_ab")
        subprocess.run(["g++", "-O2", os.path.join(HERE, "attention_ab.cpp"), "-o", harness, "-ldl"], check=True)
        libs = [build(rev, args.isa, work) for rev in revs]
        lines = [f"# Decode attention builds side by side ({time.strftime('%Y-%m-%d')})", "",
                 f"Machine: {describe_cpu()}; the {args.isa} build; OMP_NUM_THREADS="
                 f"{os.environ.get('OMP_NUM_THREADS', 'unset')}. "
                 f"`python benchmarks/attention_ab.py --revs {args.revs} --isa {args.isa}`: us a call, medians of "
                 f"{args.rounds} rounds, the builds alternating in one process; each call reads the next of "
                 f"{args.caches} caches, the last 64 positions masked.", "",
                 "| shape | KV dtype | context | " + " | ".join(f"{rev} us" for rev in revs) + " | " +
                 " | ".join(f"{rev} / {revs[0]}" for rev in revs[1:]) + " |",
                 "|---|---|---|" + "---|" * (2 * len(revs) - 1)]

        def row(label, h, hkv, d, dtype, context):
            us = run_case(harness, libs, h, hkv, d, context, KINDS[dtype], args)
            return " | ".join(f"{x:.1f}" for x in us) + " | " + " | ".join(f"{x / us[0]:.2f}x" for x in us[1:])

        table(lines, row, args)


if __name__ == "__main__":
    main()
