"""The bf16 GEMV on the module's own weight (zen_bf16_rows_avx512) against the packed copy
(zen_bf16_gemv_avx512) on llama1b-4l and SmolLM2 shapes at M = 1 and 4, timed as the autotuner
times (rotating copies, ``timing.weight_copies`` / ``time_kernel``), 9 interleaved rounds, medians.

    python benchmarks/bf16_gemv_rows.py        (needs AVX512-BF16; the table in results/bf16-gemv-rows.md)
"""
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import zen_inductor  # noqa: E402,F401  (loads the op library)
from zen_inductor.kernels import KERNELS, DenseWeight, LinearSpec  # noqa: E402
from zen_inductor.timing import time_kernel, weight_copies  # noqa: E402

shapes = {"llama1b qkv": (3072, 2048), "llama1b o": (2048, 2048), "llama1b gate/up": (16384, 2048), "llama1b down": (2048, 8192),
          "smollm2 qkv": (960, 576), "smollm2 gate/up": (3072, 576), "smollm2 down": (576, 1536)}
names = ["zen_bf16_gemv_avx512", "zen_bf16_rows_avx512"]
for label, (n, k) in shapes.items():
    spec = LinearSpec(n=n, k=k, group_size=k, bits=16, symmetric=True, act_dtype=torch.bfloat16)
    w = DenseWeight(torch.randn(n, k, dtype=torch.bfloat16))
    for m in (1, 4):
        copies = {nm: weight_copies(KERNELS[nm].prepack(w, torch.bfloat16), m) for nm in names}
        x = torch.randn(m, k, dtype=torch.bfloat16)
        res = {nm: [] for nm in names}
        for rnd in range(9):
            for nm in (names if rnd % 2 else names[::-1]):
                res[nm].append(time_kernel(KERNELS[nm], x, copies[nm], None, spec, reps=5))
        a, b = (statistics.median(res[nm]) for nm in names)
        gbs = n * k * 2 / b / 1e3
        print(f"{label} {n}x{k} M={m}: packed {a:.1f} us, rows {b:.1f} us ({b / a:.2f}x, rows {gbs:.1f} GB/s)", flush=True)
