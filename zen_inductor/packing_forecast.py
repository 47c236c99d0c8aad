"""How many bytes the packings of the linears not yet packed will take, so that a bf16 copy made
now leaves room for them (graph_pass.materialize)."""
from __future__ import annotations

import torch

from .kernels import KERNELS


class PackingForecast:
    """Bytes the packings of the linears not yet packed will take: their codes at their bits with a scale and
    an offset a group, times the layouts a linear keeps: at least two (a linear without a copy keeps its decode
    GEMV's and a prefill kernel's), more where the packings so far took more (an 8B model's int4 gate/up
    linears kept three: 1.66 bytes a weight). bf16 copies are not packings: they are what the forecast bounds."""

    def __init__(self, specs: list):
        self.least_ahead = sum(map(least_packing_bytes, specs))
        self.least_done = self.bytes_done = 0

    def after(self, spec) -> int:
        """The forecast for the linears after ``spec``, the next to be packed."""
        self.least_ahead -= least_packing_bytes(spec)
        ratio = max(LAYOUTS_A_LINEAR, self.bytes_done / self.least_done if self.least_done else 0.0)
        return int(self.least_ahead * ratio)

    def packed(self, spec, tuning) -> None:
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for name, tensors in tuning.packed.items() if not KERNELS[name].copy_bytes_per_weight
                    for t in tensors if isinstance(t, torch.Tensor)}
        self.least_done += least_packing_bytes(spec)
        self.bytes_done += sum(storages.values())


LAYOUTS_A_LINEAR = 2


def least_packing_bytes(spec) -> int:
    return spec.n * spec.k * min(spec.bits, 16) // 8 + spec.n * (spec.k // max(spec.group_size, 1)) * 8
