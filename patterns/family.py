"""What a fusion family is (its name, its flag, how it applies), and the one-node rewrite loop."""
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Family:
    name: str  # counter key and report "pattern"
    flag: str  # zen_inductor.config flag that turns it on
    apply: Callable  # apply(ctx: PatternContext) -> None


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


def replace_outputs(graph, node, out) -> None:
    """Route every ``getitem`` of a multi-output ``node`` (flash attention's) to ``out`` and erase
    them and ``node``. Dead code elimination would not: flash attention takes a dropout
    probability, so FX counts it as a random op, and AOTInductor's graph kept running it."""
    for user in list(node.users):
        user.replace_all_uses_with(out)
        graph.erase_node(user)
    graph.erase_node(node)
