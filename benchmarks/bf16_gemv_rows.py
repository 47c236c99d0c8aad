"""The bf16 GEMV on the module's own weight (zen_bf16_rows_avx512) against the packed copy
(zen_bf16_gemv_avx512) on llama1b-4l and SmolLM2 shapes at M = 1 and 4: rotating copies of each
weight (96 MB in all) so calls read from memory, 9 interleaved rounds, medians.

    python benchmarks/bf16_gemv_rows.py        (needs AVX512-BF16; the table in results/bf16-gemv-rows.md)
"""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import zen_inductor  # noqa: E402,F401  (loads the op library)
from zen_inductor.kernels import KERNELS, DenseWeight, LinearSpec  # noqa: E402
from zen_inductor.verification import run_kernel  # noqa: E402

shapes = {"llama1b qkv": (3072, 2048), "llama1b o": (2048, 2048), "llama1b gate/up": (16384, 2048), "llama1b down": (2048, 8192),
          "smollm2 qkv": (960, 576), "smollm2 gate/up": (3072, 576), "smollm2 down": (576, 1536)}
names = ["zen_bf16_gemv_avx512", "zen_bf16_rows_avx512"]
for label, (n, k) in shapes.items():
    spec = LinearSpec(n=n, k=k, group_size=k, bits=16, symmetric=True, act_dtype=torch.bfloat16)
    copies = max(2, int(96e6 // (n * k * 2)))
    ws = [torch.randn(n, k, dtype=torch.bfloat16) for _ in range(copies)]
    packed = {nm: [KERNELS[nm].prepack(DenseWeight(w), torch.bfloat16) for w in ws] for nm in names}
    for m in (1, 4):
        x = torch.randn(m, k, dtype=torch.bfloat16)
        res = {nm: [] for nm in names}
        for rnd in range(9):
            for nm in (names if rnd % 2 else names[::-1]):
                kern = KERNELS[nm]
                for p in packed[nm][:2]: run_kernel(kern, x, p, None, spec)
                t = time.perf_counter()
                for p in packed[nm]: run_kernel(kern, x, p, None, spec)
                res[nm].append((time.perf_counter() - t) / len(packed[nm]) * 1e6)
        a, b = (statistics.median(res[nm]) for nm in names)
        gbs = n * k * 2 / b / 1e3
        print(f"{label} {n}x{k} M={m}: packed {a:.1f} us, rows {b:.1f} us ({b / a:.2f}x, rows {gbs:.1f} GB/s)", flush=True)
