"""How Inductor's Python wrapper calls our C++ ops: one CPython call each, not ``torch.ops``.

Inductor calls an op it has no lowering for through ``torch.ops`` (a FallbackKernel). For ours
that cost ~3.7 us a call before the kernel ran, most of it the dispatcher parsing the schema's
lists and string and boxing them, on kernels of 10-40 us at decode (151 calls a SmolLM2 step).
Lowered here, the wrapper calls the same C++ code (csrc/ops.cpp) through a CPython function of
the op library with the same arguments, in the schema's order:

    buf7 = zen_fast.linear(x, [w0, w1, w2], None, 'woq_avx512', 960, [576, 32], [4, 2], False, None)

In a C++ wrapper (``cpp_wrapper``), with ``config.fast_wrapper_calls`` off, or where the op
library cannot load, an op stays Inductor's ordinary fallback call. The lowerings are registered
once, at import, like the ops themselves: they concern only our ops.
"""
from __future__ import annotations

from typing import Any

import torch
from torch._inductor import ir
from torch._inductor.lowering import fallback_handler, register_lowering
from torch._inductor.virtualized import V

from . import attention, config, native
from .kernels.op import native_linear

_decode_attention = attention.decode_attention

# the wrapper module's name for the library's functions, and the line that binds it
_MODULE = "zen_fast"
_IMPORT = f"from zen_inductor.native import fast_calls as _zen_fast_calls; {_MODULE} = _zen_fast_calls()"


def _calls_directly() -> bool:
    return config.fast_wrapper_calls and not V.graph.cpp_wrapper and native.fast_calls() is not None


class WrapperCall(ir.ExternKernelAlloc):
    """One of our ops as ``zen_fast.<function>(...)`` in the Python wrapper, which returns its output.

    ``arguments``: the call's arguments in order, each ("input", i), ("inputs", [i, ...]) for a
    list of inputs, or ("value", v) for a constant.
    """

    def __init__(self, layout, inputs, function: str, arguments: list):
        super().__init__(layout, inputs, python_kernel_name=f"{_MODULE}.{function}")
        self.arguments = arguments

    def codegen(self, wrapper) -> None:
        wrapper.add_import_once(_IMPORT)
        refs = [i.codegen_reference() for i in self.inputs]

        def text(argument) -> str:
            kind, value = argument
            if kind == "input":
                return refs[value]
            if kind == "inputs":
                return "[" + ", ".join(refs[i] for i in value) + "]"
            return wrapper.val_to_arg_str(value)

        wrapper.writeline(f"{self.get_name()} = {self.python_kernel_name}({', '.join(text(a) for a in self.arguments)})")
        self.codegen_size_asserts(wrapper)  # where Inductor's size asserts are on (config.runtime_size_asserts)

    def apply_constraint(self) -> None:
        pass


def _call(function: str, layout: ir.FixedLayout, values: list) -> Any:
    """A WrapperCall of ``function`` on ``values`` (IR nodes, lists of them, constants, None),
    returning a tensor of ``layout``."""
    inputs, arguments = [], []

    def add(value):
        inputs.append(ir.ExternKernel.realize_input(value))
        return len(inputs) - 1

    for value in values:
        if isinstance(value, (ir.IRNode, ir.TensorBox)):
            arguments.append(("input", add(value)))
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, (ir.IRNode, ir.TensorBox)) for v in value):
            arguments.append(("inputs", [add(v) for v in value]))
        else:
            arguments.append(("value", value))
    node = WrapperCall(layout, inputs, function, arguments)
    return ir.TensorBox.create(node)


@register_lowering(native_linear, type_promotion_kind=None)
def _linear(x, weight, bias, entry, n, dims, extra, swiglu, *, residual=None):
    if not _calls_directly():
        return fallback_handler(native_linear, add_to_fallback_set=False)(
            x, weight, bias, entry, n, dims, extra, swiglu, residual=residual)
    dtype = torch.float32 if residual is not None else x.get_dtype()  # the residual's sum is fp32
    layout = ir.FixedLayout(x.get_device(), dtype, [x.get_size()[0], n // 2 if swiglu else n])
    return _call("linear", layout, [x, list(weight), bias, entry, n, list(dims), list(extra), swiglu, residual])


@register_lowering(_decode_attention, type_promotion_kind=None)
def _attention(q, k, v, mask, scale, k_scale=None, v_scale=None):
    if not _calls_directly():
        return fallback_handler(_decode_attention, add_to_fallback_set=False)(q, k, v, mask, scale, k_scale, v_scale)
    layout = ir.FixedLayout(q.get_device(), q.get_dtype(), list(q.get_size()))  # [B, H, 1, D], rows packed
    return _call("decode_attention", layout, [q, k, v, mask, scale, k_scale, v_scale])
