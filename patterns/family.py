"""What a fusion family is, and the graph facts every family reads (views, conversions, fake values)."""
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx

# the ops the families look through: shape-only views between a linear and its users, and dtype
# conversions (decomposed or not)
VIEWS = (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default)
CONVERTS = (torch.ops.prims.convert_element_type.default, torch.ops.aten._to_copy.default)


@dataclass(frozen=True)
class Family:
    name: str  # counter key and report "pattern"
    flag: str  # zen_inductor.config flag that turns it on
    apply: Callable  # apply(ctx: PatternContext) -> None


def fake_value(node):
    """The fake tensor (shape, dtype) Inductor recorded for ``node``; None for constants and
    nodes without one."""
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def is_call(node, *targets) -> bool:
    """``node`` is a call of one of ``targets``."""
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def call_arg(node, index: int, name: str, default):
    """Argument ``name`` of a call, given by position ``index`` or by keyword."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def rewrite_each(pattern: str, search: Callable, why_not: Callable, rewrite: Callable, left_to: str) -> Callable:
    """``apply`` of a family whose matches are single nodes: each node ``search`` finds is
    rewritten, or recorded as a near miss with the constraint it failed (``left_to: reason``)."""

    def apply(ctx) -> None:
        for node in list(search(ctx)):
            reason = why_not(node)
            if reason:
                ctx.record.near_miss(pattern, node, f"{left_to}: {reason}")
            else:
                rewrite(ctx, node)

    return apply
