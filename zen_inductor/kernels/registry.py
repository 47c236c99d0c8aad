"""Every kernel of every family, and which of them may run a linear.

``candidates(spec)`` is the one place availability is decided: config's allow and deny lists,
the kernel's own ``supports``, memory for a kernel whose packing is a float copy of the weight,
the CPU's vector extensions for a native library (checked before any build starts), whether that
library built, and dominance (a kernel that others available here beat by construction is left
out, with the reason).
"""
from __future__ import annotations

from .. import config, native
from ..allocator import memory_short_of
from . import aten_ops, dense, dequantize, gguf_blocks, int8_rows, tiles, zentorch_ops
from .contract import Kernel
from .epilogues import SWIGLU_NATIVE
from .weights import LinearSpec

KERNELS: dict[str, Kernel] = {k.name: k for family in (zentorch_ops, aten_ops, int8_rows, tiles, gguf_blocks, dequantize, dense) for k in family.KERNELS}


def candidates(spec: LinearSpec, packings_ahead: int = 0) -> tuple[list[Kernel], dict[str, str]]:
    """Kernels that may run ``spec``, and the reason each other kernel may not. ``packings_ahead``:
    bytes the compile's other linears still need for their packings, which a copy must leave."""
    reasons = {}
    for kernel in KERNELS.values():
        if config.kernel_allow and kernel.name not in config.kernel_allow:
            reasons[kernel] = "not in config.kernel_allow"
        elif kernel.name in config.kernel_deny:
            reasons[kernel] = "in config.kernel_deny"
        elif spec.dynamic_activation and config.model_activation_quantization and kernel.activations != "int8 per row":
            reasons[kernel] = f"activations {kernel.activations}, not the model's int8 per row (config.model_activation_quantization)"
        else:  # a library this CPU cannot run is never built: its kernels are out before any start
            reasons[kernel] = kernel.supports(spec) or (native.missing_isa(kernel.native) if kernel.native else None)
            if not reasons[kernel] and kernel.copy_bytes_per_weight:
                reasons[kernel] = memory_short_of(kernel.copy_bytes_per_weight * spec.n * spec.k + packings_ahead)
    if config.prune_dominated_kernels:  # first by kernels that need no build: none is built for a kernel left out
        reasons.update(_dominated([k for k, r in reasons.items() if not r], lambda k: not k.native))
    for kernel in (k for k, r in reasons.items() if not r):
        for library in filter(None, (kernel.native, *kernel.helpers)):
            native.start(library)  # the builds this spec needs run side by side
    if spec.epilogue == "swiglu" and any(not r and spec.epilogue not in k.epilogues for k, r in reasons.items()):
        native.start(SWIGLU_NATIVE)  # apply_epilogue's, for the kernels that do not fuse it
    ok, excluded = [], {}
    for kernel, reason in reasons.items():
        reason = reason or (native.unavailable(kernel.native) if kernel.native else None)
        if reason:
            excluded[kernel.name] = reason
        else:
            ok.append(kernel)
    if config.prune_dominated_kernels:  # then by what was built
        for kernel, reason in _dominated(ok, lambda k: True).items():
            ok.remove(kernel)
            excluded[kernel.name] = reason
    return ok, excluded


def _dominated(kernels: list, may_dominate) -> dict:
    """kernel -> why it is left out, for the ``kernels`` that others among them dominate."""
    names = {k.name for k in kernels if may_dominate(k)}
    out = {}
    for kernel in kernels:
        groups = [(entry,) if isinstance(entry, str) else entry for entry in kernel.dominated_by]
        better = next((group for group in groups if all(name in names for name in group)), None)
        if better:
            verb = "computes" if len(better) == 1 else "compute"
            out[kernel] = f"{' and '.join(better)} {verb} the same, faster (config.prune_dominated_kernels)"
    return out

