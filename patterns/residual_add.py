"""residual_add: the residual stream of a decoder carried in fp32 by the linears that write it.

Matches (joint graph, after the linear families)::

    y  = zen.quant_linear(x, ...)               [M, H], its only user the view
    h1 = add(h0, view(y, shape of h0))          either operand order; same shape and dtype

and chains of them: h0 is the previous layer's such add, or anything else (the embedding), where
the stream starts.

Why: Inductor inlines a residual add into every pointwise kernel that reads the sum, so each
layer's RMSNorm kernel recomputes the stream from the embedding (in fp32, no rounding between)
until its read threshold realizes a buffer. Every layer's norm is then different C++ code: in a
4-layer 1B shape 8 more kernels a graph to compile, ~7 s of a 45 s cold int4 compile that stock
Inductor (its oneDNN linears add the residual in their epilogue) does in 38. The sum inside the
linear's op is a buffer once per add, so the norms are one kernel for every layer; and carrying it
in fp32 keeps the precision the recompute had, without its limit: h is never rounded to bf16,
where eager rounds it at every add (whole-model logits measured closer to fp32 than eager's).

Constraints: y has no other user; the add broadcasts nothing; h0 is a floating tensor defined
before the linear (so the linear can read it).

Replacement: ``zen.quant_linear(x, ..., residual=view(s0, [-1, H]))``, which returns ``s0 + y``
in fp32, where ``s0`` is the previous fold's fp32 sum or ``convert(h0, f32)``; users of h1 that
upcast it read the fp32 sum itself, the others its downcast.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from zen_inductor.kernels import quant_linear

from zen_inductor.graph_facts import CONVERTS, VIEWS, fake_value, is_call

from .family import Family

aten = torch.ops.aten
prims = torch.ops.prims

PATTERN = "residual_add"


def _upcast(node: fx.Node) -> bool:
    """``node`` converts its input to fp32 and nothing else."""
    if node.target is prims.convert_element_type.default:
        return node.args[1] == torch.float32
    return node.target is aten._to_copy.default and set(node.kwargs) <= {"dtype"} and node.kwargs.get("dtype") == torch.float32


# --- search -----------------------------------------------------------------------------------


def search(ctx):
    """The adds of a linear's output to another tensor, in graph order."""
    return [add for add in ctx.graph.find_nodes(op="call_function", target=aten.add.Tensor) if operands(add)]


def operands(add: fx.Node):
    """``(h0, view, linear)`` of ``add`` as it is now (an earlier fold may have changed h0), or None."""
    for h0, view in (add.args[:2], add.args[1::-1]):
        if is_call(view, *VIEWS) and is_call(view.args[0], quant_linear) and isinstance(h0, fx.Node):
            return h0, view, view.args[0]
    return None


# --- constraints --------------------------------------------------------------------------------


def why_not(add, h0, view, linear, order: dict) -> str | None:
    if len(add.kwargs) or len(add.args) != 2:
        return "the add is scaled (alpha)"
    if len(linear.users) != 1 or len(view.users) != 1:
        return "the linear's output has other users"
    vals = [fake_value(n) for n in (add, h0, view)]
    if any(v is None for v in vals):
        return "no shapes recorded"
    if not vals[1].is_floating_point() or any(v.dtype != vals[0].dtype for v in vals):
        return f"dtypes {[str(v.dtype) for v in vals]} differ or are not floating"
    if any(list(v.shape) != list(vals[0].shape) for v in vals):  # SymInts: no sets
        return "the add broadcasts"
    if h0 in order and order[h0] > order[linear]:
        return "the residual is computed after the linear"
    return None


# --- rewrite ------------------------------------------------------------------------------------


def fold(ctx, add, h0, view, linear, sums: dict) -> None:
    """Put ``h0 + y`` into the linear's op, in fp32; ``sums`` maps a downcast stream to its fp32 sum."""
    graph = ctx.graph
    match = ctx.record.match(PATTERN, f"fp32_stream_{str(fake_value(add).dtype).replace('torch.', '')}", add,
                             "zen.quant_linear adds the residual, in fp32")
    if "zen_quant" in linear.meta:  # the linear's kernels per bin, filled in when it is tuned
        match.kernels = linear.meta["zen_quant"].match.kernels
    width = fake_value(linear).shape[-1]
    start = sums.get(h0)
    with graph.inserting_before(linear):
        if start is None:  # the stream starts here: its first fp32 copy
            start = graph.call_function(prims.convert_element_type.default, (h0, torch.float32))
            start.meta["val"] = fake_value(h0).to(torch.float32)
        residual = graph.call_function(aten.view.default, (start, [-1, width]))
    residual.meta["val"] = fake_value(start).view(-1, width)
    linear.kwargs = {**linear.kwargs, "residual": residual}
    linear.meta["val"] = fake_value(linear).to(torch.float32)
    view.meta["val"] = fake_value(view).to(torch.float32)  # view of the fp32 sum: the new stream
    with graph.inserting_after(view):
        downcast = graph.call_function(prims.convert_element_type.default, (view, fake_value(add).dtype))
    downcast.meta.update({k: v for k, v in add.meta.items() if k in ("val", "stack_trace", "nn_module_stack")})
    for user in list(add.users):
        if is_call(user, *CONVERTS) and _upcast(user):
            user.replace_all_uses_with(view)
            graph.erase_node(user)
    add.replace_all_uses_with(downcast)  # the other users see the model's dtype (dead if none)
    graph.erase_node(add)
    sums[downcast] = view


def apply(ctx) -> None:
    order = {n: i for i, n in enumerate(ctx.graph.nodes)}
    sums: dict = {}
    for add in search(ctx):
        h0, view, linear = operands(add)
        reason = why_not(add, h0, view, linear, order)
        if reason:
            ctx.record.near_miss(PATTERN, add, f"residual add left to Inductor: {reason}")
        else:
            fold(ctx, add, h0, view, linear, sums)


FAMILY = Family(PATTERN, "residual_add", apply)
