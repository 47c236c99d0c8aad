"""linear_epilogue: the SwiGLU of an MLP computed inside the merged gate/up linear's kernel.

Matches (joint graph, after concat_linear and dense_matmul)::

    y = zen.quant_linear(x, ...)                     gate/up merged by concat_linear, 2 x I wide
    gate, up = split_with_sizes(y, [I, I], 1)
    out = silu(view(gate)) * view(up)                silu in any spelling (below), either order

Why: the merged GEMM would write 2 x I values per row for a second kernel to read back, and at
decode that elementwise kernel and the split cost about as much as a small GEMV. The native
kernels compute ``silu(gate) * up`` on their fp32 accumulators (one bf16 rounding instead of
eager's three); every other candidate gets the same epilogue applied after it
(``kernels.apply_epilogue``), so the autotuner still chooses freely.

Constraints: the split has exactly the two parts, of equal width I with I a multiple of 8; the
gate and up outputs and every step of the silu have no other users (else the 2 x I result is
needed anyway: a near miss).

Replacement: one ``zen.quant_linear`` with ``LinearSpec.epilogue = "swiglu"`` whose weight rows
come as blocks of 8 gate rows and 8 up rows in turn (``kernels.swiglu_row_order``), I wide.
"""
from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from zen_inductor.record import NoKernel
from zen_inductor.graph_pass import LazyWeight, PendingLinear
from zen_inductor.kernels import SWIGLU_BLOCK, DenseWeight, quant_linear, swiglu_row_order

from zen_inductor.graph_facts import VIEWS, is_call

from .family import Family

aten = torch.ops.aten
prims = torch.ops.prims

PATTERN = "linear_epilogue"


def _chain(node, targets) -> list:
    """``node`` and the nodes of ``targets`` (views, dtype conversions) below it, top first."""
    chain = [node]
    while is_call(chain[-1], *targets):
        chain.append(chain[-1].args[0])
    return chain


_CONVERT = (prims.convert_element_type.default,)


# --- search -----------------------------------------------------------------------------------


def silu_input(node: fx.Node):
    """``(x, steps)`` if ``node`` computes ``silu(x)``, else None; ``steps``: the nodes from
    ``node`` down to x, x excluded.

    Spellings: ``aten.silu``; Inductor's decomposition ``x / (1 + exp(-x))``; ``x * sigmoid(x)``;
    each with an fp32 upcast of x and a downcast of the result.
    """
    steps = _chain(node, _CONVERT)  # the downcast of the result, if any, then the core op
    core = steps[-1]
    x = None
    if is_call(core, aten.silu.default):
        x = core.args[0]
    elif is_call(core, aten.div.Tensor) and is_call(core.args[1], aten.add.Tensor):
        add = core.args[1]
        exp, one = add.args if is_call(add.args[0], aten.exp.default) else add.args[::-1]
        if one == 1 and is_call(exp, aten.exp.default) and is_call(exp.args[0], aten.neg.default) and exp.args[0].args[0] is core.args[0]:
            x, steps = core.args[0], steps + [add, exp, exp.args[0]]
    elif is_call(core, aten.mul.Tensor):
        for a, sig in (core.args, core.args[::-1]):
            if is_call(sig, aten.sigmoid.default) and sig.args[0] is a:
                x, steps = a, steps + [sig]
    if not isinstance(x, fx.Node):
        return None
    *converts, x = _chain(x, _CONVERT)
    return x, steps + converts


class SwiGLU:
    """One ``silu(gate) * up`` on the halves of a split linear, with every node in between."""

    def __init__(self, mul, split, gate, up, region, gate_views):
        self.mul, self.split, self.gate, self.up = mul, split, gate, up
        self.region = region  # nodes from the getitems up to the mul, the mul excluded
        self.gate_views = gate_views  # views between the gate getitem and silu, top first


def search(ctx):
    for mul in ctx.graph.find_nodes(op="call_function", target=aten.mul.Tensor):
        for a, b in (mul.args, mul.args[::-1]):
            found = silu_input(a) if isinstance(a, fx.Node) else None
            if found is None or not isinstance(b, fx.Node):
                continue
            *gate_views, gate = _chain(found[0], VIEWS)
            *up_views, up = _chain(b, VIEWS)
            if not (is_call(gate, operator.getitem) and is_call(up, operator.getitem) and gate.args[0] is up.args[0]):
                continue
            split = gate.args[0]
            if is_call(split, aten.split_with_sizes.default) and is_call(split.args[0], quant_linear):
                yield SwiGLU(mul, split, gate, up, found[1] + gate_views + [gate] + up_views + [up], gate_views)
                break


# --- constraints --------------------------------------------------------------------------------


def why_not(m: SwiGLU) -> str | None:
    linear = m.split.args[0]
    sizes = list(m.split.args[1])
    if len(sizes) != 2 or sizes[0] != sizes[1] or m.split.args[2] not in (1, -1):
        return f"the linear is split into {sizes}, not two equal halves"
    if sizes[0] % SWIGLU_BLOCK:
        return f"width {sizes[0]} is not a multiple of {SWIGLU_BLOCK}"
    if not isinstance(linear.meta.get("zen_quant"), PendingLinear) or len(linear.users) != 1:
        return "the merged linear's output has other users"
    inside = set(m.region) | {m.mul}
    for node in m.region:
        if not set(node.users) - set(_leading_size_queries(node, m.mul)) <= inside:
            return f"{node.name} is also used outside silu(gate) * up"
    vals = [n.meta.get("val") if isinstance(n, fx.Node) else None for n in (m.mul, *m.mul.args)]
    if any(v is None for v in vals) or any(list(v.shape) != list(vals[0].shape) for v in vals):  # SymInts: no sets
        return "silu(gate) and up are broadcast against each other"
    return None


def _leading_size_queries(node: fx.Node, mul: fx.Node) -> list:
    """Users of ``node`` that only read one of its leading dimensions, which ``mul``'s result has
    too: with a dynamic prompt length, the next layer reads the sequence length off the linear's
    output (``sym_size.int(view, 1)``). They can read it off the fused result instead."""
    val, out = node.meta.get("val"), mul.meta.get("val")
    if val is None or out is None or val.dim() != out.dim():
        return []
    return [u for u in node.users if is_call(u, aten.sym_size.int) and u.args[1] % val.dim() < val.dim() - 1
            and val.shape[u.args[1]] == out.shape[u.args[1]]]


# --- rewrite ------------------------------------------------------------------------------------


def _reorder_rows(weight, rows: torch.Tensor):
    if isinstance(weight, DenseWeight):
        return DenseWeight(weight.weight[rows].contiguous())
    return weight.reordered(rows)


def fuse_swiglu(ctx, m: SwiGLU) -> None:
    linear = m.split.args[0]
    pending: PendingLinear = linear.meta["zen_quant"]
    width = m.split.args[1][0]
    rows = swiglu_row_order(width)
    if m.gate.args[1] == 1:  # up comes first in the merged weight
        rows = (rows + width) % (2 * width)
    old = pending.weight
    weight = LazyWeight(old.n, old.k, old.group_size, old.bits, old.symmetric,
                        read=lambda: _reorder_rows(old.get(), rows), parts=(old,))
    spec = dataclasses.replace(pending.spec, epilogue="swiglu")
    bias = pending.bias
    if bias is not None:
        bias = ctx.add_constant(ctx.evaluate(bias)[rows].contiguous(), linear, "swiglu_bias")
    fused = ctx.emit_quant_linear(linear, linear.args[0], weight, spec, bias, pending.sources, PATTERN, "swiglu", m.mul)
    fused.meta["zen_quant"].match.replacement = f"silu(gate) * up in the kernel of the merged linear ({pending.match.variant})"
    out = fused
    if m.gate_views:  # the model's shape of the result, e.g. [batch, seq, I]
        with ctx.graph.inserting_after(fused):
            out = ctx.graph.call_function(aten.view.default, (fused, m.gate_views[0].args[1]))
        out.meta["val"] = m.mul.meta["val"]
    m.mul.replace_all_uses_with(out)
    for node in m.region:
        for query in _leading_size_queries(node, m.mul):
            query.replace_input_with(node, out)
    pending.match.replacement += " with the SwiGLU epilogue fused"
    pending.match.kernels = fused.meta["zen_quant"].match.kernels  # the merge's report shows the kernels too


def apply(ctx) -> None:
    for m in list(search(ctx)):
        reason = why_not(m)
        if reason:
            ctx.record.near_miss(PATTERN, m.mul, f"silu(gate) * up after a merged linear not fused: {reason}")
            continue
        try:
            fuse_swiglu(ctx, m)
        except NoKernel as e:
            ctx.record.near_miss(PATTERN, m.mul, f"no kernel for the SwiGLU linear: {e}")


FAMILY = Family(PATTERN, "linear_epilogue", apply)
