"""Decode attention over a real cache length: zen's C++ kernel against ATen's SDPA and the GEMM form
Inductor compiles, as microseconds a call and as GB/s of K and V read against the machine's read
bandwidth.

Each call reads one of ``--layers`` caches in turn, as a decode step walks its layers, so K and V
come from wherever a model's would (the whole set is over this VM's L2). A static cache is
``--context`` positions long with its last 64 unwritten (masked), as at a step of generate().

    python benchmarks/decode_attention.py [--contexts 512,2048,4096] [--out benchmarks/results/decode-attention.md]
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.linears import read_bandwidth_gbs  # noqa: E402
from benchmarks.smollm2 import cpu  # noqa: E402
from zen_inductor.attention import decode_attention, unavailable  # noqa: E402

SHAPES = {"smollm2 (9 heads / 3 KV, D 64)": (9, 3, 64), "llama1b (32 heads / 8 KV, D 64)": (32, 8, 64)}
UNWRITTEN = 64


def gemms(q, k, v, mask, scale):
    """The fallback's arithmetic: per KV head, its query heads as one GEMM, fp32 softmax, one GEMM."""
    b, h, _, d = q.shape
    hkv = k.shape[1]
    scores = q.float().view(b, hkv, h // hkv, d) @ k.float().transpose(-1, -2) * scale + mask.view(b, 1, 1, -1)
    return (torch.softmax(scores, -1) @ v.float()).view(b, h, 1, d).to(q.dtype)


def per_call_us(call, caches, reps: int) -> float:
    for cache in caches:
        call(*cache)
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for cache in caches:
            call(*cache)
        samples.append((time.perf_counter() - t0) / len(caches) * 1e6)
    return statistics.median(samples)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--contexts", default="512,2048,4096")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", default="")
    args = p.parse_args()
    if unavailable():
        raise SystemExit(f"zen.decode_attention cannot run here: {unavailable()}")
    compiled = torch.compile(gemms, dynamic=False)
    bandwidth = read_bandwidth_gbs()
    lines = [f"# Decode attention, one query position over a static cache ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {cpu()}, {torch.get_num_threads()} threads; read bandwidth {bandwidth:.1f} GB/s (a 512 MB buffer "
             f"summed). Batch 1; each call reads the next of {args.layers} caches, as a decode step walks its layers; "
             f"the last {UNWRITTEN} positions of each cache unwritten (masked). `python benchmarks/decode_attention.py`, "
             f"medians of {args.reps} passes. GB/s: bytes of K and V up to the last visible position over the time.", "",
             "| shape | KV dtype | context | zen C++ us | GB/s | of read bandwidth | ATen SDPA us | GEMMs (Inductor) us |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for label, (h, hkv, d) in SHAPES.items():
        for dtype in (getattr(torch, name) for name in args.dtypes.split(",")):
            for context in (int(c) for c in args.contexts.split(",")):
                torch.manual_seed(0)
                mask = torch.zeros(1, 1, 1, context, dtype=dtype)
                mask[..., context - UNWRITTEN:] = float("-inf")
                caches = [(torch.randn(1, h, 1, d, dtype=dtype), torch.randn(1, hkv, context, d, dtype=dtype),
                           torch.randn(1, hkv, context, d, dtype=dtype), mask) for _ in range(args.layers)]
                scale = 1 / math.sqrt(d)
                q, k, v, _ = caches[0]
                ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.float(),
                                                                       enable_gqa=True)
                assert (decode_attention(q, k, v, mask, scale).float() - ref).norm() / ref.norm() < 1e-2
                zen = per_call_us(lambda q, k, v, m: decode_attention(q, k, v, m, scale), caches, args.reps)
                sdpa = per_call_us(lambda q, k, v, m: torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=m, enable_gqa=True), caches, args.reps)
                torch._dynamo.reset()
                fused = per_call_us(lambda q, k, v, m: compiled(q, k, v, m, scale), caches, args.reps)
                read = 2 * hkv * (context - UNWRITTEN) * d * k.element_size()
                gbs = read / zen / 1e3
                row = (f"| {label} | {str(dtype).replace('torch.', '')} | {context} | {zen:.1f} | {gbs:.1f} | "
                       f"{gbs / bandwidth:.0%} | {sdpa:.1f} | {fused:.1f} |")
                print(row, flush=True)
                lines.append(row)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
