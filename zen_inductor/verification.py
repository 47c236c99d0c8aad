"""A candidate kernel's output on the real weight against the fp32 reference: a fast wrong kernel
must never win."""
from __future__ import annotations

import dataclasses
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


# A kernel that passed on one weight of a shape is checked on the compile's other weights of that
# shape on this many rows of W, in tiles spread over N: its output on the real packing, each weight's
# own values, without the pass over the whole weight a full reference takes (5-6 s of a cold 1B
# int4 compile, 15 layers of each shape checked again at every row count).
SAMPLED_ROWS = 256
SAMPLE_TILE = 16  # rows a sampled tile spans: a SwiGLU weight's gate and up blocks of 8 together


class Verifier:
    """``verify(kernel, m) -> reason | None``: the kernel's output on this weight against fp32.

    ``passed``: (spec, kernel, m) that passed a full check in this compile, shared by its linears;
    on another weight of the same spec those are checked on ``SAMPLED_ROWS`` rows of W."""

    def __init__(self, spec, weight, bias, packed, passed: Optional[set] = None):
        self.spec, self.bias, self.packed, self.weight = spec, bias, packed, weight
        self.threshold = SQNR_DYNAMIC_DB if spec.dynamic_activation else SQNR_WEIGHT_ONLY_DB
        self.verdicts: dict = {}
        self.passed = passed if passed is not None else set()

    @functools.cached_property
    def row_counts(self) -> tuple:
        # three row counts reach a kernel's distinct paths (GEMV, small and blocked GEMM); the
        # largest is capped near 1 GFLOP so a slow candidate cannot stall the compile
        return 1, 16, max(16, min(VERIFY_MAX_M, int(1e9 / (2 * self.spec.n * self.spec.k))))

    def __call__(self, name: str, m: int) -> Optional[str]:
        m = 1 if m == 1 else 16 if m <= 16 else self.row_counts[-1]
        if (name, m) not in self.verdicts:
            key = (self.spec, name, m)
            sampled = key in self.passed and self.sample is not None
            self.verdicts[name, m] = self.check(name, m, sampled)
            if self.verdicts[name, m] is None and not sampled:
                self.passed.add(key)
        return self.verdicts[name, m]

    @functools.cached_property
    def sample(self) -> Optional[torch.Tensor]:
        """The output columns a sampled check compares: SAMPLE_TILE-row tiles of W spread over N
        (gate/up pairs of a SwiGLU weight stay whole); None where W is too small to sample."""
        n = self.spec.n
        tiles = n // SAMPLE_TILE
        if n % SAMPLE_TILE or tiles * SAMPLE_TILE <= 2 * SAMPLED_ROWS:
            return None
        picked = torch.linspace(0, tiles - 1, SAMPLED_ROWS // SAMPLE_TILE).round().long().unique()
        return (picked[:, None] * SAMPLE_TILE + torch.arange(SAMPLE_TILE)).reshape(-1)

    @functools.cached_property
    def inputs(self) -> dict:
        """m -> the x a check runs, the same for full and sampled checks."""
        # a generator of its own: seeding torch's global one changed the user's random state and
        # cost ~1 ms a call inside a compile (0.9 s of a cold 1B compile)
        return {m: torch.randn(m, self.spec.k, dtype=self.spec.act_dtype, generator=torch.Generator().manual_seed(m))
                for m in sorted(set(self.row_counts))}

    @functools.cached_property
    def references(self) -> dict:
        """m -> (x, fp32 reference output) for every row count, made on the first check (not at
        all when the tuning is memoized). One pass over the weight a block of rows at a time: the
        whole fp32 weight came from fresh pages (~0.5 s a GB here) and was read once per m."""
        xs = self.inputs
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

    @functools.cached_property
    def sampled_references(self) -> dict:
        """m -> (x, fp32 reference of the sampled rows' outputs, their columns in the kernel's output)."""
        rows = self.sample
        w = torch.empty((rows.numel(), self.spec.k), dtype=torch.float32)
        for i in range(0, rows.numel(), SAMPLE_TILE):
            start = int(rows[i])
            self.weight.dequantize_rows(w[i:i + SAMPLE_TILE], start, start + SAMPLE_TILE)
        swiglu = self.spec.epilogue == "swiglu"
        # a SwiGLU weight's 16 rows from 16t give outputs 8t .. 8t + 7
        columns = (rows.view(-1, SAMPLE_TILE)[:, :1] // 2 + torch.arange(SAMPLE_TILE // 2)).reshape(-1) if swiglu else rows
        spec = dataclasses.replace(self.spec, n=rows.numel())
        bias = self.bias[rows].to(torch.float32) if self.bias is not None else 0
        return {m: (x, epilogue_reference(x.to(torch.float32) @ w.t() + bias, spec), columns) for m, x in self.inputs.items()}

    def check(self, name, m, sampled: bool = False):
        if sampled:
            x, ref, columns = self.sampled_references[m]
        else:
            (x, ref), columns = self.references[m], None
        if self.packed[name] is None:
            return "prepack failed"
        try:
            y = run_kernel(KERNELS[name], x, self.packed[name], self.bias, self.spec)
            db = sqnr_db(y if columns is None else y[:, columns], ref)
        except Exception as e:
            return f"failed: {type(e).__name__}: {e}"
        where = f" ({ref.shape[1]} of its outputs)" if sampled else ""
        return None if db >= self.threshold else f"SQNR {db:.1f} dB < {self.threshold:.0f} dB against the fp32 reference{where}"

