"""The arithmetic ceilings under the bars a peer's kernel already reaches.

    python benchmarks/isa_ceilings.py [--out benchmarks/results/isa-ceilings.md]

Where zen and a peer run the same kind of kernel, a ratio between them is bounded by how close the
peer's kernel is to what the CPU's units can do. This measures that: the throughput of the
instructions each kernel's inner loop is made of (benchmarks/isa_ceilings.c, timed on one core and
on every core at once), and beside each ceiling the peer's kernel on the shapes of the bar:

- int8 x int8 GEMMs on AVX2 (``torch._int_mm``, oneDNN capped at AVX2 as on an AVX2-only EPYC, llama1b's
  linears at a 2048-token prompt): vpmaddubsw + vpmaddwd, 32 multiply-adds a pair, which saturates;
  zen's exact GEMM: vpmaddwd + vpaddd, 16 a pair;
- bf16 GEMMs on one core (zentorch's linear, as vLLM's CPU worker runs them, SmolLM2's linears at
  prefill rows): vdpbf16ps, 32 multiply-adds;
- decode attention capped at AVX2 (bf16 K and V, llama1b's heads at 4096 positions): its fp32 FMAs
  alone against the time to read K and V at this machine's read bandwidth.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from zen_inductor.cpu import describe as describe_cpu, hardware_flags  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BLOCKS = 20_000_000  # of 12 or 24 instructions: ~30-60 ms a call
ISA_AVX2 = {"ZEN_INDUCTOR_CPU_CAPABILITY": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
            "ONEDNN_MAX_CPU_ISA": "AVX2"}

# name in isa_ceilings.c -> (CPU flags it needs, instructions a block, multiply-adds an instruction, what it is)
INSTRUCTIONS = {
    "fma_ymm": (("avx2", "fma"), 12, 8, "vfmadd231ps ymm (fp32)"),
    "maddubs_madd_ymm": (("avx2",), 12, 16, "vpmaddubsw + vpmaddwd ymm (AVX2 u8 x s8: 32 a pair)"),
    "madd_add_ymm": (("avx2",), 12, 8, "vpmaddwd + vpaddd ymm (exact 16-bit: 16 a pair)"),
    "maddubs_beside_fma_ymm": (("avx2", "fma"), 12, 0, "vpmaddubsw beside vfmadd231ps ymm"),
    "dpbf16_zmm": (("avx512_bf16",), 24, 32, "vdpbf16ps zmm (AVX512-BF16)"),
    "dpbusd_zmm": (("avx512_vnni",), 24, 64, "vpdpbusd zmm (AVX512-VNNI u8 x s8)"),
}

# llama1b's linears (K, N) at a 2048-token prompt, q/k/v and gate/up as zen merges them
LLAMA1B_INT8 = [(2048, 3072), (2048, 2048), (2048, 16384), (8192, 2048)]
# SmolLM2-135M's linears (K, N), merged likewise
SMOLLM2_BF16 = [(576, 960), (576, 576), (576, 3072), (1536, 576)]


def build(tmp: str) -> ctypes.CDLL:
    path = os.path.join(tmp, "isa_ceilings.so")
    subprocess.run([os.environ.get("CC", "gcc"), "-O2", "-shared", "-fPIC", os.path.join(HERE, "isa_ceilings.c"),
                    "-o", path], check=True)
    return ctypes.CDLL(path)


def instructions_per_s(fn, per_block: int, threads: int) -> float:
    """Instructions a second over `threads` cores running fn at once (ctypes lets go of the GIL)."""
    def one():
        fn(ctypes.c_int64(BLOCKS))

    rates = []
    for _ in range(5):
        workers = [threading.Thread(target=one) for _ in range(threads)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        rates.append(per_block * BLOCKS * threads / (time.perf_counter() - t0))
    return statistics.median(rates)


def ceilings(lib: ctypes.CDLL, cores: int) -> dict:
    have = hardware_flags()
    out = {}
    for name, (needs, per_block, macs, what) in INSTRUCTIONS.items():
        if not set(needs) <= have:
            continue
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_int64]
        one, every = instructions_per_s(fn, per_block, 1), instructions_per_s(fn, per_block, cores)
        out[name] = {"what": what, "core_g": one / 1e9, "all_g": every / 1e9, "gflops_core": 2 * macs * one / 1e9,
                     "gflops_all": 2 * macs * every / 1e9}
    return out


def time_ms(fn, reps: int = 15) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def peer_int8_gemms(rows: int) -> dict:
    """torch._int_mm (oneDNN's u8s8 GEMM) and zen's exact AVX2 GEMM (zen_a8w8_gemm_avx2's sums) on
    llama1b's shapes, in this process's ISA and threads; and how many of _int_mm's sums are wrong on
    int8 codes of a Gaussian (what per-row quantization of activations and weights gives)."""
    import torch

    from zen_inductor.kernels.int8_rows import _gemm_sums

    shapes = {}
    for k, n in LLAMA1B_INT8:
        x = (torch.randn(rows, k) * 40).round().clamp(-127, 127).to(torch.int8)
        w = (torch.randn(n, k) * 40).round().clamp(-127, 127).to(torch.int8)
        ms = time_ms(lambda: torch._int_mm(x, w.t()))
        ours_ms = time_ms(lambda: _gemm_sums(x, w))
        wrong = (torch._int_mm(x, w.t()) != _gemm_sums(x, w)).float().mean().item()
        shapes[f"{rows}x{k}x{n}"] = {"ms": ms, "gflops": 2 * rows * k * n / ms / 1e6, "ours_ms": ours_ms,
                                     "ours_gflops": 2 * rows * k * n / ours_ms / 1e6, "wrong": wrong}
    return shapes


def peer_bf16_gemms(rows: int) -> dict:
    """zentorch's prepacked bf16 linear on one thread (vLLM's CPU worker's), SmolLM2's shapes."""
    import torch
    import zentorch  # noqa: F401

    torch.set_num_threads(1)
    shapes = {}
    for k, n in SMOLLM2_BF16:
        x = torch.randn(rows, k, dtype=torch.bfloat16)
        w = torch.ops.zentorch.zentorch_weight_prepack_for_linear(torch.randn(n, k, dtype=torch.bfloat16))
        ms = time_ms(lambda: torch.ops.zentorch.zentorch_linear_unary(x, w, is_weight_prepacked=True))
        shapes[f"{rows}x{k}x{n}"] = {"ms": ms, "gflops": 2 * rows * k * n / ms / 1e6}
    return shapes


def read_bandwidth_gbs() -> float:
    import torch

    buf = torch.ones(128 << 20, dtype=torch.float32)
    return buf.numel() * 4 / time_ms(buf.sum, reps=7) * 1e3 / 1e9


def in_child(part: str, env: dict) -> dict:
    """One measurement in a new process: an ISA cap only takes hold before the libraries load."""
    out = subprocess.run([sys.executable, __file__, "--part", part], env={**os.environ, **env},
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(c: dict, int8_avx2: dict, bf16: dict, bandwidth: float, cores: int) -> list[str]:
    lines = [f"# Arithmetic ceilings under the bars a peer's kernel reaches ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {describe_cpu()}, {cores} cores. `python benchmarks/isa_ceilings.py`: each instruction "
             "timed in blocks of 12 (ymm) or 24 (zmm) independent ones (medians of 5), on one core and on "
             "every core at once; each peer kernel a median of 15 calls after 3.", "",
             "| instruction | G a second, one core | G a second, all cores | GFLOP/s, all cores |", "|---|---|---|---|"]
    for v in c.values():
        flops = f"{v['gflops_all']:.0f}" if v["gflops_all"] else "-"
        lines.append(f"| {v['what']} | {v['core_g']:.2f} | {v['all_g']:.2f} | {flops} |")
    if "maddubs_madd_ymm" in c:
        peak, exact = c["maddubs_madd_ymm"]["gflops_all"], c["madd_add_ymm"]["gflops_all"]
        lines += ["", f"torch._int_mm capped at AVX2 ({cores} threads), llama1b's linears at 2048 rows, against "
                  f"the AVX2 u8 x s8 ceiling of {peak:.0f} GFLOP/s, and zen's exact GEMM (csrc/int8_gemm_avx2.cpp) "
                  f"against the vpmaddwd + vpaddd ceiling of {exact:.0f}; wrong: the share of _int_mm's int32 sums "
                  "that differ from the exact ones, on int8 codes of a Gaussian:", "",
                  "| M x K x N | _int_mm ms | GFLOP/s | of its ceiling | wrong | zen ms | GFLOP/s | of its ceiling |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {s} | {v['ms']:.1f} | {v['gflops']:.0f} | {v['gflops'] / peak:.0%} | {v['wrong']:.1%} | "
                  f"{v['ours_ms']:.1f} | {v['ours_gflops']:.0f} | {v['ours_gflops'] / exact:.0%} |"
                  for s, v in int8_avx2.items()]
    if bf16 and "dpbf16_zmm" in c:
        peak = c["dpbf16_zmm"]["gflops_core"]
        lines += ["", f"zentorch's prepacked bf16 linear on one thread, SmolLM2's linears, against one core's "
                  f"vdpbf16ps ceiling of {peak:.0f} GFLOP/s:", "",
                  "| M x K x N | ms | GFLOP/s | of the ceiling |", "|---|---|---|---|"]
        lines += [f"| {s} | {v['ms']:.2f} | {v['gflops']:.0f} | {v['gflops'] / peak:.0%} |" for s, v in bf16.items()]
    # llama1b's decode attention at 4096 positions: 8 KV heads of 4 queries, D 64, bf16 K and V
    positions, kv_heads, group, d = 4096, 8, 4, 64
    fmas = 2 * positions * kv_heads * group * d // 8  # scores and V's sums, 8 lanes a ymm FMA
    fma_us = fmas / (c["fma_ymm"]["all_g"] * 1e9) * 1e6
    read_us = 2 * positions * kv_heads * d * 2 / (bandwidth * 1e9) * 1e6
    lines += ["", f"Decode attention capped at AVX2, llama1b's heads at {positions} positions, bf16 K and V: "
              f"{fmas / 1e6:.2f} M ymm FMAs take {fma_us:.0f} us on {cores} cores at the rate above; reading "
              f"its {2 * positions * kv_heads * d * 2 / 1e6:.1f} MB at this run's read bandwidth "
              f"({bandwidth:.1f} GB/s, a 512 MB sum) takes {read_us:.0f} us: the FMAs alone are "
              f"{fma_us / read_us:.0%} of the read time."]
    return lines


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None, help="markdown results file (default: print)")
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.part:  # a child's one measurement, as one line of JSON
        part = {"int8": lambda: peer_int8_gemms(2048), "bf16": lambda: peer_bf16_gemms(512),
                "bandwidth": read_bandwidth_gbs}[args.part]
        print(json.dumps(part()))
        return
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        c = ceilings(build(tmp), cores)
    int8_avx2 = in_child("int8", ISA_AVX2)
    bf16 = in_child("bf16", {}) if "avx512_bf16" in hardware_flags() else {}
    lines = report(c, int8_avx2, bf16, in_child("bandwidth", {}), cores)
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
