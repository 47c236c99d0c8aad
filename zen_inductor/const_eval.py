"""Evaluate the weight-only part of a graph on the real weights, at compile time.

Inside the joint pass the weights are placeholders; the real tensors sit in the tracing context.
A pattern that must know more than shapes (is this int8 tensor really int4? is the zero point
all zeros? which group size do the scales follow?) asks this evaluator, which reads the dequant
chain on probe codes (weight_reading.py).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch._guards import TracingContext


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
        if node.op == "get_attr" and not _written(node):
            const.add(node)
        elif node.op == "call_function" and node not in const:
            inputs = node.all_input_nodes
            if inputs and all(i in const for i in inputs):
                const.add(node)
    return const


def _written(node: fx.Node) -> bool:
    """Whether an op writes into ``node`` in place: a buffer the model updates (an exported KV
    cache, unlifted by AOTInductor as a get_attr) is not a constant."""
    for user in node.users:
        schema = getattr(user.target, "_schema", None)
        if schema is None or not user.args or user.args[0] is not node:
            continue
        alias = schema.arguments[0].alias_info if schema.arguments else None
        if alias is not None and alias.is_write:
            return True
    return False


class ConstEvaluator:
    """Runs constant subgraphs eagerly, on the real weights."""

    def __init__(self, gm: fx.GraphModule | None, params: dict[fx.Node, torch.Tensor]):
        self.gm = gm
        self.params = params

    def __call__(self, node: fx.Node) -> torch.Tensor:
        return self._eval(node, {})

    def _eval(self, node, memo):
        if node in memo:
            return memo[node]
        if node in self.params:
            value = self.params[node]
        elif node.op == "get_attr":
            value = operator.attrgetter(node.target)(self.gm)  # dotted where an exported module is unlifted
        elif node.op == "call_function":
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: self._eval(n, memo))
            value = node.target(*args, **kwargs)
        else:
            raise ValueError(f"cannot evaluate {node.op} node {node.name} at compile time")
        memo[node] = value
        return value


def fold_calls(graph: fx.Graph, target, constants: set, evaluate: "ConstEvaluator", add_constant) -> None:
    """Every call of ``target`` on constants replaced by its value, computed now, as freezing
    folds aten ops: for custom ops Inductor cannot look into and would call at every run
    (``add_constant(value, like, prefix)`` puts a value in the graph). Dead code goes first:
    a call that only replaced ops read was folded for nothing (a GB of SmolLM2's weights)."""
    if not graph.find_nodes(op="call_function", target=target):
        return  # no dead-code pass for graphs without the op (every graph of every other model)
    graph.eliminate_dead_code()
    for node in graph.find_nodes(op="call_function", target=target):
        if node.users and node in constants:
            node.replace_all_uses_with(add_constant(evaluate(node), node, "folded"))
            graph.erase_node(node)
