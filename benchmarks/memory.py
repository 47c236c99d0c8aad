"""Memory of a compiled model against the quantized weights it holds (issue: <= 1.3x).

    python benchmarks/memory.py [--system zen|inductor] [--quant int4wo|da8w4|...] [demo model flags]

One process per call (RSS is per process). Builds the demo model, quantizes it, and reports:
the bytes of its quantized linear weights as torchao stores them (int4 codes sit in int8, 1 B
per weight) and as int4 would (0.5 B per weight, plus scales); the tensor bytes that compiling
added (every live tensor storage, before and after, found through the garbage collector); and the
process RSS before compiling, after compiling and after a generate().
"""
from __future__ import annotations

import argparse
import gc
import os
import sys

import torch


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def live_storages() -> dict:
    found = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and not isinstance(obj, torch._subclasses.FakeTensor) and obj.device.type == "cpu":
                st = obj.untyped_storage()
                found[st.data_ptr()] = st.nbytes()
        except Exception:  # tensor subclasses without one storage, meta tensors
            continue
    return found


def quantized_bytes(model) -> tuple[float, float]:
    stored = ideal = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and hasattr(module.weight, "qdata"):
            w = module.weight
            meta = sum(getattr(w, a).numel() * getattr(w, a).element_size() for a in ("scale", "zero_point") if getattr(w, a, None) is not None)
            stored += w.qdata.numel() * w.qdata.element_size() + meta
            bits = 4 if int(w.qdata.min()) >= -8 and int(w.qdata.max()) <= 15 else 8
            ideal += w.qdata.numel() * bits / 8 + meta
    return stored / 2**20, ideal / 2**20


def main():
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from zen_inductor import demo

    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    p.add_argument("--system", default="zen", choices=("zen", "inductor"))
    p.add_argument("--discard", action="store_true",
                   help="Inductor's freezing_discard_parameters: the eager model's weights are released (and unusable); "
                        "torch 2.13 fails on torchao's tensor subclasses here")
    args = p.parse_args()
    model = demo.quantize(demo.build_model(args), args.quant, args.group)
    gc.collect()
    stored, ideal = quantized_bytes(model)
    before_rss, before = rss_mb(), live_storages()
    prompt = torch.randint(0, args.vocab, (1, args.prompt))
    with torch.no_grad():
        options = {"freezing_discard_parameters": True} if args.discard else None
        if args.system == "inductor":
            torch._inductor.config.freezing = True
        forward = torch.compile(model.forward, backend="zen" if args.system == "zen" else "inductor", options=options)
        demo.generate(forward, prompt, args.new)
    gc.collect()
    after_rss, after = rss_mb(), live_storages()
    added = sum(n for ptr, n in after.items() if ptr not in before) / 2**20
    print(f"{args.system}{' (discard)' if args.discard else ''} {args.quant}: quantized linear weights {stored:.1f} MB as stored by torchao, {ideal:.1f} MB as int{4 if ideal < stored else 8}")
    print(f"  tensors added by compiling: {added:.1f} MB = {added / ideal:.2f}x the quantized weights")
    print(f"  RSS: {before_rss:.0f} MB before compile, {after_rss:.0f} MB after compile + generate ({after_rss - before_rss:+.0f} MB)")


if __name__ == "__main__":
    main()
