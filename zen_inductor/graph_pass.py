"""The one graph pass Inductor runs for us: every enabled pattern family, in catalog order.

It sits in ``joint_custom_post_pass``: after AOTAutograd, *before* freezing. Freezing would
otherwise constant-fold int4 dequant chains back into bf16 weights; here the weights are still
placeholders whose real values the tracing context holds, so a pattern can read them, prepack
them once, and leave packed constants in the graph for freezing to keep.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from . import config
from .autotune import Tuner
from .const_eval import ConstEvaluator, constant_nodes, param_values
from .record import CompileRecord


@dataclass
class PatternContext:
    """What a pattern family gets: the graph, the real weights, and where to write results."""

    graph: fx.Graph
    gm: fx.GraphModule
    params: dict
    constants: set
    evaluate: ConstEvaluator
    record: CompileRecord
    tuner: Tuner = field(default_factory=Tuner)
    _attr_count: int = 0

    @property
    def frozen(self) -> bool:
        return bool(self.params)

    def add_constant(self, tensor: torch.Tensor, like: fx.Node, prefix: str) -> fx.Node:
        """A new weight owned by the compiled module, inserted before ``like``.

        Marked as a frozen parameter: Inductor's FX graph cache then keys it by metadata and
        re-reads its value from this module on a hit, instead of replaying a stored copy that
        belongs to whichever model was compiled first.
        """
        name = f"_zen_{prefix}_{self._attr_count}"
        self._attr_count += 1
        tensor._is_frozen_param = True
        self.gm.register_buffer(name, tensor, persistent=False)
        with self.graph.inserting_before(like):
            node = self.graph.get_attr(name)
        fake_mode = _fake_mode(self.graph)
        if fake_mode is not None:
            node.meta["val"] = fake_mode.from_tensor(tensor, static_shapes=True)
        self.constants.add(node)
        self.evaluate.params[node] = tensor
        return node


def _fake_mode(graph: fx.Graph):
    for node in graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch._subclasses.FakeTensor):
            return val.fake_mode
    return None


@functools.lru_cache(None)
def _source_files() -> tuple:
    import zen_inductor
    import zen_inductor.patterns as patterns

    files = []
    for package in (zen_inductor, patterns):
        root = os.path.dirname(package.__file__)
        files += sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".py"))
    return tuple(files)


class ZenJointPass(CustomGraphPass):
    def __init__(self, record: CompileRecord):
        self.record = record

    def __call__(self, graph: fx.Graph) -> None:
        from zen_inductor.patterns import FAMILIES

        gm = graph.owning_module
        self.record.graph_before = _readable(gm)
        params = param_values(graph)
        self.record.frozen = bool(params)
        ctx = PatternContext(graph, gm, params, constant_nodes(graph, params), ConstEvaluator(gm, params), self.record)
        # the joint passes run under Inductor's fake mode; our reads of real weights must not
        with torch._subclasses.fake_tensor.unset_fake_temporarily():
            for family in FAMILIES:
                if getattr(config, family.flag):
                    family.apply(ctx)
        graph.eliminate_dead_code()
        gm.recompile()
        self.record.graph_after = _readable(gm)

    def uuid(self) -> bytes:
        # Inductor's FX graph cache keys on this: any change to our code or flags misses.
        return get_hash_for_files(_source_files(), extra=repr(sorted(config.get_config_copy().items())))


def _readable(gm: fx.GraphModule) -> str:
    try:
        return gm.print_readable(print_output=False, include_stride=False, include_device=False, colored=False)
    except Exception:
        return str(gm.graph)
