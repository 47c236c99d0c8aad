"""How our C++ linear entries are called: ``zen::quant_linear.native`` (csrc/ops.cpp).

Each entry takes ``(x, *weight, bias, y, M, N, *dims, x_bf16, y_bf16, has_bias, *extra, swiglu,
residual, has_residual)``; the op lays that out in C++ and checks it against the argument count
the library declares (native.SOURCES). A kernel of ours says only which entry it runs and what
its packed weight gives it (``NativeLinear``): the Python path of ``zen::quant_linear`` and the
graph's direct call (graph_pass, where a linear's rows are known) share that description.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import native
from .weights import LinearSpec


@dataclass(frozen=True)
class NativeCall:
    """One entry's arguments for one weight, besides x, bias and residual."""

    weight: tuple  # packed tensors, in the entry's order
    dims: tuple  # ints after M and N
    extra: tuple = ()  # ints after the flags


@dataclass(frozen=True)
class NativeLinear:
    """A kernel's ``run`` that is one of our C++ linear entries. ``arguments(packed, spec)``
    describes its call; the run takes ``residual=`` (an fp32 [M, N_out] added as y is stored)."""

    library: str
    arguments: Callable[[list, LinearSpec], tuple]  # -> (weight tensors, dims, extra)

    def call(self, packed, spec: LinearSpec) -> NativeCall:
        weight, dims, extra = self.arguments(packed, spec)
        return NativeCall(tuple(weight), tuple(dims), tuple(extra))

    def __call__(self, x, packed, bias, spec: LinearSpec, residual=None):
        native.load(self.library)  # built and bound once; a memo after that
        call = self.call(packed, spec)
        return torch.ops.zen.quant_linear.native(x, list(call.weight), bias, self.library, spec.n, list(call.dims),
                                                 list(call.extra), spec.epilogue == "swiglu", residual=residual)
