"""Where a decode step of the real model goes: torch.profiler over steps of SmolLM2 (GGUF Q4_1
blocks, StaticCache), by self CPU time, for stock Inductor and zen.

    python benchmarks/decode_profile.py [--systems inductor,zen] [--steps 16] [--prompt 128] [--skip-module-guards]
                                        [--file Q4_1|Q8_0|Q4_0|path.gguf]

--skip-module-guards compiles with torch.compile's guard_filter_fn
``torch.compiler.skip_guard_on_all_nn_modules_unsafe`` (Dynamo stops checking the model's modules
each step: right when nothing reassigns them, as in generation), for every system alike.

Prints, per system, the median step time unprofiled and the profiled steps' top ops; the step
breakdown the overhead work of the llama.cpp issue is measured against.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--systems", default="inductor,zen")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--skip-module-guards", action="store_true")
    p.add_argument("--file", default="Q4_1", help="a block format of the wheel's model (smollm2.gguf_path) or a GGUF path")
    args = p.parse_args()
    from transformers import StaticCache

    import zen_inductor
    from benchmarks.smollm2 import compiled_forward
    from zen_inductor.smollm2 import gguf_path

    for system in args.systems.split(","):
        torch._dynamo.reset()
        model, _ = zen_inductor.load_gguf(args.file if args.file.endswith(".gguf") else gguf_path(args.file))
        forward = compiled_forward(model, system, args.skip_module_guards)
        length, total = args.prompt, args.prompt + 3 * args.steps + 8
        ids = torch.randint(0, 1000, (1, length))
        cache = StaticCache(config=model.config, max_cache_len=total)
        position = [length]

        @torch.no_grad()
        def step(token):
            out = forward(input_ids=token, past_key_values=cache, cache_position=torch.tensor(position), use_cache=True,
                          logits_to_keep=1)
            position[0] += 1
            return out.logits[:, -1:].argmax(-1)

        with torch.no_grad():
            token = forward(input_ids=ids, past_key_values=cache, cache_position=torch.arange(length), use_cache=True,
                            logits_to_keep=1).logits[:, -1:].argmax(-1)
        for _ in range(3):  # compiles the decode graph
            token = step(token)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            token = step(token)
            times.append(time.perf_counter() - t0)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                token = step(token)
        print(f"\n== {system}: median step {statistics.median(times) * 1e3:.2f} ms unprofiled; "
              f"profiled, per step (ms):")
        rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:14]
        for e in rows:
            print(f"  {e.self_cpu_time_total / 1e3 / args.steps:8.3f}  {e.count / args.steps:6.1f} calls  {e.key[:90]}")
        torch._inductor.config.freezing = False


if __name__ == "__main__":
    main()
