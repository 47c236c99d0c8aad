"""dense_matmul: an unquantized bf16 linear, dispatched per shape bin like the quantized ones.

Matches (joint graph, after concat_linear, so merged q/k/v and gate/up come as one)::

    y = mm(x, permute(W)) | addmm(bias, x, permute(W))      W: a bf16 constant, not a dequant chain

Why: on a CPU without native bf16 (AVX2) a bf16 GEMM runs 5-7x slower than an fp32 one once it
is compute-bound (prefill), while at decode the bf16 weight read is what counts. Candidates:
``dense_mm`` (bf16 GEMM on the model's own weight) and ``dense_sgemm`` (upcast per call, fp32
GEMM); the autotuner picks per M bin. No weight is copied.

Constraints: bf16 activations and weight; weight frozen.

Linears a serving engine runs in its own ops (vLLM: zentorch's linear on weights zentorch
prepacked on AMD CPUs with AVX-512, oneDNN or packed bf16/int4/int8 kernels elsewhere, on Intel
CPUs through ``auto_functionalized`` since they write into an output they are given) hold their
weights in that library's layout: they are left to it, and each is recorded as a near miss saying
whose op it is. On SmolLM2's shapes zentorch's prepacked bf16 linear beat our kernels at every M (Zen 4, one
thread: 35 against 55 us at M=1 for 960x576).
"""
from __future__ import annotations

import re

import torch

from zen_inductor.record import NoKernel
from zen_inductor.kernels import DenseWeight, LinearSpec

from zen_inductor.graph_facts import MATMULS, fake_value, matmul_operands

from .family import Family
from zen_inductor.weight_reading import find_codes

aten = torch.ops.aten

PATTERN = "dense_matmul"


def search(ctx):
    for target in MATMULS:
        for mm in ctx.graph.find_nodes(op="call_function", target=target):
            x, w, bias = matmul_operands(mm)
            if (w in ctx.constants and x not in ctx.constants and fake_value(w) is not None
                    and fake_value(w).dtype == torch.bfloat16 and fake_value(x).dtype == torch.bfloat16
                    and find_codes(w) is None and (bias is None or bias in ctx.constants)):
                yield mm


def apply(ctx) -> None:
    for mm in list(search(ctx)):
        x, w, bias = matmul_operands(mm)
        weight = ctx.weight([w], ("dense",), lambda w=w: _dense_weight(ctx.evaluate(w)))
        spec = LinearSpec(n=weight.n, k=weight.k, group_size=weight.k, bits=16, symmetric=True, act_dtype=torch.bfloat16)
        try:
            fused = ctx.emit_quant_linear(mm, x, weight, spec, bias, [w, bias], PATTERN, "bf16", mm)
        except NoKernel as e:
            ctx.record.near_miss(PATTERN, mm, f"no dense kernel for this linear: {e}")
            continue
        mm.replace_all_uses_with(fused)
    _note_engine_linears(ctx)


_ENGINE_LINEAR = re.compile(r"linear|gemm|(^|_)mm($|_)")
_OURS_OR_ATEN = {"aten", "prims", "zen", "quantized_decomposed", "torchao"}


def _note_engine_linears(ctx) -> None:
    for node in ctx.graph.nodes:
        op = _op_run(node)
        if op is None:
            continue
        namespace, _, name = op._schema.name.partition("::")
        if namespace in _OURS_OR_ATEN or not _ENGINE_LINEAR.search(name):
            continue
        packed = " on a weight it prepacked" if _argument(node, op, "is_weight_prepacked") else ""
        ctx.record.near_miss(PATTERN, node, f"left to {namespace}.{name}{packed}: a linear in another library's "
                                            "op, its weight in that library's layout")


_FUNCTIONALIZED = (torch.ops.higher_order.auto_functionalized, torch.ops.higher_order.auto_functionalized_v2)


def _op_run(node):
    """The op a call runs: its target, or the op an ``auto_functionalized`` call wraps (vLLM's
    oneDNN and packed GEMMs on Intel CPUs write into an output they are given), else None."""
    if node.op != "call_function":
        return None
    target = node.args[0] if node.target in _FUNCTIONALIZED and node.args else node.target
    return target if isinstance(target, torch._ops.OpOverload) else None


def _argument(node, op, name: str):
    positional = node.args if node.target is op else ()  # an auto_functionalized call passes all by name
    for i, arg in enumerate(op._schema.arguments):
        if arg.name == name:
            if name in node.kwargs:
                return node.kwargs[name]
            return positional[i] if i < len(positional) else arg.default_value  # tracing drops defaults
    return None


def _dense_weight(weight_kn: torch.Tensor) -> DenseWeight:
    # the model's own [N, K] tensor when the graph reads it transposed, else one contiguous copy
    return DenseWeight(weight_kn.t() if weight_kn.t().is_contiguous() else weight_kn.t().contiguous())


FAMILY = Family(PATTERN, "dense_matmul", apply)
