"""Cost of zen's per-call shape-bin dispatch: the zen::quant_linear op against its kernel called directly.

    python benchmarks/dispatch.py
"""
import statistics
import sys
import os
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from zen_inductor.kernels import KERNELS, LinearSpec, Plan, QuantWeight, quant_linear  # noqa: E402


def per_call_us(fn, calls=2000, reps=7):
    fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(samples)


def main():
    n = k = 64
    codes = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    w = QuantWeight(codes, torch.rand(n, 1) * 0.01, torch.zeros(n, 1), None, k, 8)
    spec = LinearSpec(n=n, k=k, group_size=k, bits=8, symmetric=True, act_dtype=torch.bfloat16)
    kernel = KERNELS["aten_int8pack_mm"]
    packed = kernel.prepack(w, torch.bfloat16)
    plan = Plan(spec, (1, 4, 16, 64, 256, 1024), ("aten_int8pack_mm",) * 7).encode()
    x = torch.randn(1, k, dtype=torch.bfloat16)
    direct = per_call_us(lambda: kernel.run(x, packed, None, spec))
    via_op = per_call_us(lambda: torch.ops.zen.quant_linear(x, packed, [len(packed)], None, plan))
    print(f"tiny int8 linear (N=K=64, M=1): kernel {direct:.2f} us, through zen::quant_linear {via_op:.2f} us, "
          f"dispatch {via_op - direct:.2f} us per call")


if __name__ == "__main__":
    main()
