"""Attention over a prompt under the mask transformers passes: zen.prefill_attention against the
flash kernels it calls, given the whole mask, and against ATen's own causal kernel (no mask).

The keys are a static cache of ``prompt + 64`` positions, its tail unwritten; the mask is causal
over them (transformers' when a reset StaticCache, padding or a cached prefix rules out
``is_causal``). SmolLM2's heads: 9 query over 3 KV heads of 64. Milliseconds a call, medians.

    python benchmarks/prefill_attention.py [--prompts 512,2048,4096] [--dtypes float32,bfloat16]
                                           [--out benchmarks/results/prefill-attention.md]

Run it again with ``ATEN_CPU_CAPABILITY=avx2`` for ATen's AVX2 kernels on an AVX-512 machine (fp32
only: ATen's bf16 flash attention fails under that mask here); zentorch's rows appear only where
its kernels run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from zen_inductor.cpu import describe as describe_cpu  # noqa: E402
from zen_inductor.attention import prefill_attention  # noqa: E402
from zen_inductor.cpu import zentorch_unavailable  # noqa: E402

FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
UNWRITTEN = 64
HEADS, KV_HEADS, D = 9, 3, 64


def per_call_ms(call, reps: int) -> float:
    call()
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1e3


def rows_for(prompt: int, dtype, reps: int) -> list:
    keys = prompt + UNWRITTEN
    q = torch.randn(1, HEADS, prompt, D, dtype=dtype)
    k, v = (torch.randn(1, KV_HEADS, keys, D, dtype=dtype) for _ in range(2))
    visible = torch.arange(keys)[None] <= torch.arange(prompt)[:, None]
    mask = torch.where(visible, 0.0, float("-inf")).to(dtype)[None, None]
    scale = D ** -0.5
    calls = {
        "ATen flash, whole mask": lambda: FLASH(q, k, v, 0.0, False, attn_mask=mask, scale=scale),
        "zen.prefill_attention (ATen's kernel)": lambda: prefill_attention(q, k, v, mask, scale, False),
        "ATen flash, is_causal (no mask, prompt's keys only)":
            lambda: FLASH(q, k[:, :, :prompt], v[:, :, :prompt], 0.0, True, scale=scale),
    }
    if zentorch_unavailable() is None:
        calls["zentorch_sdpa, whole mask"] = lambda: torch.ops.zentorch.zentorch_sdpa(q, k, v, 0.0, False, attn_mask=mask,
                                                                                      scale=scale)
        calls["zen.prefill_attention (zentorch's kernel)"] = lambda: prefill_attention(q, k, v, mask, scale, True)
    return [(name, per_call_ms(call, reps)) for name, call in calls.items()]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", default="512,2048,4096")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "prefill-attention.md"))
    args = p.parse_args()
    capability = torch.backends.cpu.get_cpu_capability()
    lines = [f"# Attention over a prompt under a causal mask over a static cache ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {describe_cpu()}, {torch.get_num_threads()} threads; ATen's kernels built for {capability}. "
             f"{HEADS} query over {KV_HEADS} KV heads, D {D}, keys = prompt + {UNWRITTEN} (the unwritten tail "
             f"masked). ms a call, medians of {args.reps}; ratio against ATen's flash attention given the whole mask.",
             "", "| dtype | prompt | kernel | ms | vs ATen, whole mask |", "|---|---|---|---|---|"]
    for dtype in (getattr(torch, name) for name in args.dtypes.split(",")):
        for prompt in (int(x) for x in args.prompts.split(",")):
            rows = rows_for(prompt, dtype, args.reps)
            base = rows[0][1]
            for name, ms in rows:
                lines.append(f"| {str(dtype).removeprefix('torch.')} | {prompt} | {name} | {ms:.1f} | {ms / base:.2f}x |")
                print(lines[-1], flush=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
