"""Evaluate the weight-only part of a graph on the real weights, at compile time.

Inside the joint pass the weights are placeholders; the real tensors sit in the tracing context.
A pattern that must know more than shapes (is this int8 tensor really int4? is the zero point
all zeros? which group size do the scales follow?) asks this evaluator, and proves its reading
of the dequant chain by recomputing the weight both ways.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch._guards import TracingContext

aten = torch.ops.aten
prims = torch.ops.prims

_CONVERTS = (prims.convert_element_type.default, aten._to_copy.default)


def param_values(graph: fx.Graph) -> dict[fx.Node, torch.Tensor]:
    """Placeholder -> real tensor, for the placeholders that are parameters or buffers.

    AOTAutograd puts the (subclass-flattened) parameters first, in the order of
    ``params_flat_unwrap_subclasses``; freezing relies on the same order.
    """
    ctx = TracingContext.try_get()
    params = getattr(ctx, "params_flat_unwrap_subclasses", None) if ctx else None
    if not params:
        return {}
    placeholders = graph.find_nodes(op="placeholder")
    return {node: value for node, value in zip(placeholders, params) if isinstance(value, torch.Tensor)}


def constant_nodes(graph: fx.Graph, params: dict[fx.Node, torch.Tensor]) -> set[fx.Node]:
    """Nodes whose value depends on parameters only (what freezing would fold)."""
    const: set[fx.Node] = set(params)
    for node in graph.nodes:
        if node.op == "get_attr":
            const.add(node)
        elif node.op == "call_function" and node not in const:
            inputs = node.all_input_nodes
            if inputs and all(i in const for i in inputs):
                const.add(node)
    return const


class ConstEvaluator:
    """Runs constant subgraphs eagerly, optionally with some nodes' values replaced.

    ``exact=True`` turns every conversion to a floating dtype into float32, where products of
    bf16/fp16 scales and small integer codes are exact, so an affine dequant chain can be read
    off exactly (its scale is f(1) - f(0), its offset f(0)).
    """

    def __init__(self, gm: fx.GraphModule | None, params: dict[fx.Node, torch.Tensor]):
        self.gm = gm
        self.params = params

    def __call__(self, node: fx.Node, overrides=None, exact=False) -> torch.Tensor:
        memo: dict[fx.Node, object] = dict(overrides or {})
        return self._eval(node, memo, exact)

    def _eval(self, node, memo, exact):
        if node in memo:
            return memo[node]
        if node in self.params:
            value = self.params[node]
        elif node.op == "get_attr":
            value = getattr(self.gm, node.target)
        elif node.op == "call_function":
            args, kwargs = torch.fx.node.map_arg(
                (node.args, node.kwargs), lambda n: self._eval(n, memo, exact)
            )
            if exact and node.target in _CONVERTS:
                dtype = args[1] if node.target is _CONVERTS[0] else kwargs.get("dtype")
                if dtype is not None and dtype.is_floating_point:
                    value = args[0].to(torch.float32)
                    memo[node] = value
                    return value
            value = node.target(*args, **kwargs)
        else:
            raise ValueError(f"cannot evaluate {node.op} node {node.name} at compile time")
        memo[node] = value
        return value
