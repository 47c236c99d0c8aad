"""Per-linear kernel benchmark: every candidate on the linear shapes of a model, per M.

    python benchmarks/linears.py [--model llama1b-4l] [--formats int4wo,int8wo,int8dq,bf16] [--m 1,4,16,64,128,512]

For decode (small M) a linear is bound by reading its weight: the table gives each kernel's
effective weight bandwidth next to this machine's measured read bandwidth (the roofline).
Kernels are timed back to back on rotating weight copies (cold caches, warm threads), as the
autotuner does; the winner is what zen's tuner would pick for that M.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from zen_inductor.bins import shape_bins, static_order  # noqa: E402
from zen_inductor.timing import HOPELESS_RATIO, first_call_us, time_kernel, weight_copies  # noqa: E402
from zen_inductor.verification import Verifier  # noqa: E402
from zen_inductor.kernels import KERNELS, DenseWeight, LinearSpec, QuantWeight, candidates  # noqa: E402
from zen_inductor.cpu import describe as describe_cpu  # noqa: E402
from benchmarks.e2e import MODELS  # noqa: E402


def read_bandwidth_gbs() -> float:
    """Median of a few full reads of a 512 MB buffer."""
    buf = torch.ones(128 << 20, dtype=torch.float32)
    buf.sum()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t0)
    return buf.numel() * 4 / sorted(times)[2] / 1e9


def weight_for(fmt: str, n: int, k: int):
    torch.manual_seed(0)
    if fmt == "bf16":
        return DenseWeight(torch.randn(n, k, dtype=torch.bfloat16) * 0.02), 16, False
    bits, group = (4, 128) if fmt == "int4wo" else (8, k)
    lo, hi = (-8, 8) if bits == 4 else (-127, 128)
    codes = torch.randint(lo, hi, (n, k), dtype=torch.int8)
    scale = torch.rand(n, k // group) * 0.01 + 0.001
    w = QuantWeight(codes, scale, torch.zeros_like(scale), None, group, bits)
    return w, bits, fmt == "int8dq"


def weight_bytes(w, bits):
    if bits == 16:
        return w.n * w.k * 2
    return w.n * w.k * bits // 8 + w.scale.numel() * 2


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama1b-4l", choices=sorted(MODELS))
    p.add_argument("--formats", default="int4wo,int8wo,int8dq,bf16")
    p.add_argument("--m", default="1,4,16,64,128,512")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args()
    spec_m = MODELS[args.model]
    h, i, heads, kv = spec_m["hidden"], spec_m["intermediate"], spec_m["heads"], spec_m["kv_heads"]
    hd = spec_m.get("head_dim", h // heads)
    shapes = {"qkv": (heads * hd + 2 * kv * hd, h), "o": (h, heads * hd), "gate_up": (2 * i, h), "down": (h, i), "lm_head": (spec_m["vocab"], h)}
    bw = read_bandwidth_gbs()
    lines = [f"# Per-linear kernels: {args.model} (merged q/k/v and gate/up as zen runs them)", "",
             f"Machine: {describe_cpu()}. Measured read bandwidth: {bw:.1f} GB/s, {torch.get_num_threads()} threads. Times in us (median); "
             "GB/s = weight bytes / time; `x` = not a candidate or failed verification; `>N`: one call "
             f"took over {HOPELESS_RATIO}x the best so far and was not repeated (as the autotuner does).", ""]
    for fmt in args.formats.split(","):
        for name, (n, k) in shapes.items():
            w, bits, dynamic = weight_for(fmt, n, k)
            spec = LinearSpec(n=n, k=k, group_size=w.group_size or k, bits=bits, symmetric=True,
                              act_dtype=torch.bfloat16, dynamic_activation=dynamic)
            kernels, excluded = candidates(spec)
            packed = {kk.name: kk.prepack(w, spec.act_dtype) for kk in kernels}
            verify = Verifier(spec, w, None, packed)
            names = [kk.name for kk in kernels]
            lines += [f"## {fmt} {name}: N={n} K={k}, weight {weight_bytes(w, bits) / 1e6:.1f} MB", "",
                      "| M | " + " | ".join(names) + " | winner | winner GB/s | roofline us |", "|---" * (len(names) + 4) + "|"]
            for m in [int(v) for v in args.m.split(",")]:
                x = torch.randn(m, k, dtype=torch.bfloat16)
                cell, best = {}, None
                bin_of_m = next(b for b in shape_bins() if b.hi is None or m <= b.hi)
                for kname in static_order(bin_of_m, names, spec):  # likely winners first: they set the bar
                    if verify(kname, m):
                        cell[kname] = "x"
                        continue
                    first = first_call_us(KERNELS[kname], x, packed[kname], None, spec)
                    if best is not None and first > HOPELESS_RATIO * best[1]:  # hopeless: _int_mm without VNNI took minutes
                        cell[kname] = f">{first:.0f}"
                        continue
                    copies = weight_copies(packed[kname], m)
                    t = time_kernel(KERNELS[kname], x, copies, None, spec, args.reps)
                    cell[kname] = f"{t:.0f}"
                    if best is None or t < best[1]:
                        best = (kname, t)
                cells = [cell[kname] for kname in names]
                gbs = weight_bytes(w, bits) / (best[1] * 1e-6) / 1e9
                roof = weight_bytes(w, bits) / (bw * 1e9) * 1e6
                lines.append(f"| {m} | " + " | ".join(cells) + f" | {best[0]} | {gbs:.1f} | {roof:.0f} |")
                print(lines[-1], flush=True)
            lines.append("")
            write(lines, args)  # a long run that is stopped keeps what it measured
    print("\n".join(lines))


def write(lines, args):
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"linears-{args.model}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
