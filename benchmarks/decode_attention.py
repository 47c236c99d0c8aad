"""Decode attention over a real cache length: zen's C++ kernel against ATen's SDPA and the GEMM form
Inductor compiles, as microseconds a call and as GB/s of K and V read against the machine's read
bandwidth.

Each call reads one of ``--layers`` caches in turn, as a decode step walks its layers, so K and V
come from wherever a model's would (the whole set is over this VM's L2). A static cache is
``--context`` positions long with its last 64 unwritten (masked), as at a step of generate().

    python benchmarks/decode_attention.py [--contexts 512,2048,4096] [--dtypes float32,bfloat16,int8]
                                          [--out benchmarks/results/decode-attention.md]

int8: the layout of ``zen_inductor.Int8StaticCache`` (codes and a fp32 scale a KV head and position),
read by zen's kernel; ATen's SDPA and the GEMM form are timed on the same values in bf16, the cache
a user would otherwise keep.
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

from zen_inductor.cpu import describe as describe_cpu  # noqa: E402
from zen_inductor.attention import decode_attention, unavailable  # noqa: E402
from zen_inductor.kv_cache import dequantize, quantize  # noqa: E402

SHAPES = {"smollm2 (9 heads / 3 KV, D 64)": (9, 3, 64), "llama1b (32 heads / 8 KV, D 64)": (32, 8, 64)}
UNWRITTEN = 64


def gemms(q, k, v, mask, scale):
    """The fallback's arithmetic: per KV head, its query heads as one GEMM, fp32 softmax, one GEMM."""
    b, h, _, d = q.shape
    hkv = k.shape[1]
    scores = q.float().view(b, hkv, h // hkv, d) @ k.float().transpose(-1, -2) * scale + mask.view(b, 1, 1, -1)
    return (torch.softmax(scores, -1) @ v.float()).view(b, h, 1, d).to(q.dtype)


def passes_us(call, caches, reps: int, before=lambda: None) -> list[float]:
    """us a call in each of ``reps`` passes over the caches, ``before()`` run ahead of each pass."""
    for cache in caches:
        call(*cache)
    samples = []
    for _ in range(reps):
        before()
        t0 = time.perf_counter()
        for cache in caches:
            call(*cache)
        samples.append((time.perf_counter() - t0) / len(caches) * 1e6)
    return samples


def per_call_us(call, caches, reps: int) -> float:
    return statistics.median(passes_us(call, caches, reps))


class ReadBandwidth:
    """GB/s of one sum over a 512 MB buffer, taken just before each pass of zen's calls: this VM's
    read bandwidth moved between 42 and 77 GB/s within minutes, so a figure taken once at the start
    made the share of it a kernel reached swing as much (over 100% at times)."""

    def __init__(self):
        self.buf = torch.ones(128 << 20, dtype=torch.float32)
        self.buf.sum()
        self.samples: list[float] = []

    def sample(self) -> None:
        t0 = time.perf_counter()
        self.buf.sum()
        self.samples.append(self.buf.numel() * 4 / (time.perf_counter() - t0) / 1e9)


def one_case(h, hkv, d, dtype, context, compiled, bandwidth: ReadBandwidth, args) -> dict:
    """us a call of zen's kernel, ATen's SDPA and the GEMMs; zen's GB/s of K and V, the read bandwidth
    beside it and the median over passes of the share of it zen reached."""
    torch.manual_seed(0)
    int8 = dtype == torch.int8
    values = torch.bfloat16 if int8 else dtype  # the peers' cache
    mask = torch.zeros(1, 1, 1, context, dtype=values)
    mask[..., context - UNWRITTEN:] = float("-inf")
    caches, codes = [], []
    for _ in range(args.layers):
        q, k, v = torch.randn(1, h, 1, d, dtype=values), torch.randn(1, hkv, context, d), torch.randn(1, hkv, context, d)
        if int8:
            (kc, ks), (vc, vs) = quantize(k), quantize(v)
            codes.append((q, kc, vc, mask, ks, vs))
            k, v = dequantize(kc, ks, values), dequantize(vc, vs, values)
        caches.append((q, k.to(values), v.to(values), mask))
    scale = 1 / math.sqrt(d)
    q, k, v, _ = caches[0]
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.float(), enable_gqa=True)
    bandwidth.samples.clear()
    if int8:
        assert (decode_attention(*codes[0][:4], scale, *codes[0][4:]).float() - ref).norm() / ref.norm() < 1e-2
        zen = passes_us(lambda q, k, v, m, ks, vs: decode_attention(q, k, v, m, scale, ks, vs), codes, args.reps,
                        bandwidth.sample)
    else:
        assert (decode_attention(q, k, v, mask, scale).float() - ref).norm() / ref.norm() < 1e-2
        zen = passes_us(lambda q, k, v, m: decode_attention(q, k, v, m, scale), caches, args.reps, bandwidth.sample)
    sdpa = per_call_us(lambda q, k, v, m: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=m, enable_gqa=True), caches, args.reps)
    torch._dynamo.reset()
    fused = per_call_us(lambda q, k, v, m: compiled(q, k, v, m, scale), caches, args.reps)
    visible = 2 * hkv * (context - UNWRITTEN)  # rows of K and V
    size = visible * (d + 4 if int8 else d * dtype.itemsize)
    return dict(zen=statistics.median(zen), sdpa=sdpa, fused=fused, gbs=size / statistics.median(zen) / 1e3,
                bandwidth=statistics.median(bandwidth.samples),
                share=statistics.median(size / us / 1e3 / bw for us, bw in zip(zen, bandwidth.samples)))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--contexts", default="512,2048,4096")
    p.add_argument("--dtypes", default="float32,bfloat16,int8")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", default="")
    args = p.parse_args()
    if unavailable():
        raise SystemExit(f"zen.decode_attention cannot run here: {unavailable()}")
    compiled = torch.compile(gemms, dynamic=False)
    bandwidth = ReadBandwidth()
    lines = [f"# Decode attention, one query position over a static cache ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {describe_cpu()}, {torch.get_num_threads()} threads. Batch 1; each call reads the next of "
             f"{args.layers} caches, as a decode step walks its layers; the last {UNWRITTEN} positions of each cache "
             f"unwritten (masked). `python benchmarks/decode_attention.py`, medians of {args.reps} passes. GB/s: bytes "
             f"of K and V up to the last visible position over the time (int8: codes and scales; SDPA and the GEMMs "
             f"on the same values in bf16). Read bandwidth: a 512 MB buffer summed just before each pass of zen's "
             f"calls (median); of read bandwidth: the median over passes of the pass's GB/s over the sum's.", "",
             "| shape | KV dtype | context | zen C++ us | GB/s | read bandwidth GB/s | of read bandwidth | ATen SDPA us "
             "| GEMMs (Inductor) us |",
             "|---|---|---|---|---|---|---|---|---|"]

    def row(label, h, hkv, d, dtype_name, context):
        r = one_case(h, hkv, d, getattr(torch, dtype_name), context, compiled, bandwidth, args)
        return (f"{r['zen']:.1f} | {r['gbs']:.1f} | {r['bandwidth']:.1f} | {r['share']:.0%} | {r['sdpa']:.1f} | "
                f"{r['fused']:.1f}")

    table(lines, row, args)


def table(lines: list[str], row, args) -> None:
    """``lines`` (the head), then a row a shape, KV dtype and context (``args.dtypes``,
    ``args.contexts``) whose cells after those three ``row(label, h, hkv, d, dtype, context)``
    gives; printed as they come, written to ``args.out`` if given."""
    print("\n".join(lines), flush=True)
    for label, (h, hkv, d) in SHAPES.items():
        for dtype in args.dtypes.split(","):
            for context in (int(c) for c in args.contexts.split(",")):
                line = f"| {label} | {dtype} | {context} | {row(label, h, hkv, d, dtype, context)} |"
                print(line, flush=True)
                lines.append(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
