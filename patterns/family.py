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
