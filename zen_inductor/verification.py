"""A candidate kernel's output on the real weight against the fp32 reference: a fast wrong kernel
must never win."""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from .kernels import KERNELS, epilogue_reference, fp32_row_blocks, run_kernel

SQNR_WEIGHT_ONLY_DB = 40.0
SQNR_DYNAMIC_DB = 30.0


def sqnr_db(y: torch.Tensor, ref: torch.Tensor) -> float:
    noise = float(torch.linalg.vector_norm(y.detach().float() - ref.detach().float()))
    if not math.isfinite(noise):
        return float("-inf")
    if noise == 0:
        return float("inf")
    return 20 * math.log10(float(torch.linalg.vector_norm(ref.detach(), dtype=torch.float32)) / noise)


VERIFY_MAX_M = 256  # rows checked against the reference; kernels' large-M paths start well below


class Verifier:
    """``verify(kernel, m) -> reason | None``: the kernel's output on this weight against fp32."""

    def __init__(self, spec, weight, bias, packed):
        self.spec, self.bias, self.packed, self.weight = spec, bias, packed, weight
        self.threshold = SQNR_DYNAMIC_DB if spec.dynamic_activation else SQNR_WEIGHT_ONLY_DB
        self.verdicts: dict = {}

    @functools.cached_property
    def row_counts(self) -> tuple:
        # three row counts reach a kernel's distinct paths (GEMV, small and blocked GEMM); the
        # largest is capped near 1 GFLOP so a slow candidate cannot stall the compile
        return 1, 16, max(16, min(VERIFY_MAX_M, int(1e9 / (2 * self.spec.n * self.spec.k))))

    def __call__(self, name: str, m: int) -> Optional[str]:
        m = 1 if m == 1 else 16 if m <= 16 else self.row_counts[-1]
        if (name, m) not in self.verdicts:
            self.verdicts[name, m] = self.check(name, m)
        return self.verdicts[name, m]

    @functools.cached_property
    def references(self) -> dict:
        """m -> (x, fp32 reference output) for every row count, made on the first check (not at
        all when the tuning is memoized). One pass over the weight a block of rows at a time: the
        whole fp32 weight came from fresh pages (~0.5 s a GB here) and was read once per m."""
        xs = {}
        for m in sorted(set(self.row_counts)):
            torch.manual_seed(m)
            xs[m] = torch.randn(m, self.spec.k, dtype=self.spec.act_dtype)
        x32 = torch.cat(list(xs.values())).to(torch.float32)
        ref = torch.empty((x32.shape[0], self.spec.n), dtype=torch.float32)
        for w, start, end in fp32_row_blocks(self.spec.n, self.spec.k):
            self.weight.dequantize_rows(w, start, end)
            torch.mm(x32, w.t(), out=ref[:, start:end])
        if self.bias is not None:
            ref += self.bias.to(torch.float32)
        out, row = {}, 0
        for m, x in xs.items():
            out[m] = (x, epilogue_reference(ref[row:row + m], self.spec))
            row += m
        return out

    def check(self, name, m):
        x, ref = self.references[m]
        if self.packed[name] is None:
            return "prepack failed"
        try:
            db = sqnr_db(run_kernel(KERNELS[name], x, self.packed[name], self.bias, self.spec), ref)
        except Exception as e:
            return f"failed: {type(e).__name__}: {e}"
        return None if db >= self.threshold else f"SQNR {db:.1f} dB < {self.threshold:.0f} dB against the fp32 reference"

