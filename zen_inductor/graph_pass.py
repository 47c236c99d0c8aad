"""The one graph pass Inductor runs for us: every enabled pattern family, in catalog order.

It sits in ``joint_custom_post_pass``: after AOTAutograd, before Inductor's freezing would
run (Inductor's freezing would constant-fold int4 dequant chains back into bf16 weights). Here
the weights are still placeholders whose real values the tracing context holds, so a pattern can
read them, prepack them once, and leave packed constants in the graph, marked as frozen
parameters as Inductor's freezing marks its own.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._inductor.freezing_utils import record_has_frozen_params
from torch._inductor.virtualized import V

from . import config, native
from .allocator import memory_short_of, release_freed_memory
from .autotune import Tuner
from .const_eval import ConstEvaluator, constant_nodes, fold_calls, param_values
from .graph_facts import may_be_one
from .kernels import (KERNELS, LAZY, NativeLinear, Plan, candidates, linear_by_rows, native_linear, quant_linear,
                      swiglu_row_order)
from .packing_forecast import PackingForecast
from .record import CompileRecord, NoKernel


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
    keep: set = field(default_factory=set)  # weight nodes dead code elimination must leave until materialize
    ahead_of_time: bool = False  # AOTInductor: the weights are the graph's get_attr nodes

    @property
    def frozen(self) -> bool:
        return bool(self.params) or self.ahead_of_time

    def add_constant(self, tensor: torch.Tensor, like: fx.Node, prefix: str) -> fx.Node:
        """A new weight owned by the compiled module, inserted before ``like``.

        Marked as a frozen parameter: Inductor's FX graph cache then keys it by metadata and
        re-reads its value from this module on a hit, instead of replaying a stored copy that
        belongs to whichever model was compiled first. Registered persistent: the cache key
        pickles the module's set of non-persistent buffer names, whose order changes with
        Python's string hashing, so every compile missed the cache.
        """
        name = f"_zen_{prefix}_{self._attr_count}"
        self._attr_count += 1
        tensor._is_frozen_param = True
        self.gm.register_buffer(name, tensor)
        with self.graph.inserting_before(like):
            node = self.graph.get_attr(name)
        fake_mode = _fake_mode(self.graph)
        if fake_mode is not None:
            node.meta["val"] = fake_mode.from_tensor(tensor, static_shapes=True)
        self.constants.add(node)
        self.evaluate.params[node] = tensor
        return node

    def memo(self, nodes: list, key: tuple, compute):
        """``compute()`` once per weights and key in this process. One model compiles to several
        graphs (prefill, first decode step, dynamic decode); they share readings, tuning and packed
        weights instead of redoing and re-holding them. The memo sits on the model's own weight
        tensor, so it lives exactly as long as the weight."""
        store, rest = self._memo_store(nodes)
        if store is None:
            return compute()
        if (key, *rest) not in store:
            store[key, *rest] = compute()
        return store[key, *rest]

    def _memo_store(self, nodes: list) -> tuple:
        """The memo of the weights behind ``nodes`` and what else its keys hold, or (None, ())."""
        sources = self._sources(nodes)
        if not sources:
            return None, ()
        owner = max(sources, key=lambda t: t.numel())
        rest = (tuple((id(t), t._version) for t in sources), _config_signature())
        return owner.__dict__.setdefault("_zen_memo", _Memo()), rest

    def _packed_before(self, nodes: list, spec) -> dict:
        """Layout -> packed tensors that earlier graphs of the model (other rows of x) hold for this weight."""
        store, rest = self._memo_store(nodes)
        tunings = [t for (key, *others), t in (store or {}).items() if key[:2] == ("tune", spec) and tuple(others) == rest]
        return {KERNELS[name].packing: t.packed[name] for t in tunings for name in t.plan.kernels}

    def _storages(self, nodes: list) -> frozenset:
        """Where the model's tensors behind ``nodes`` live: a reading that is one of them costs nothing to keep."""
        return frozenset(t.untyped_storage().data_ptr() for t in self._sources(nodes))

    def _sources(self, nodes: list) -> list:
        seen, stack, found = set(), [n for n in nodes if isinstance(n, fx.Node)], []
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            if node in self.params:
                found.append(self.params[node])
            stack.extend(node.all_input_nodes)
        return found

    def weight(self, nodes: list, key: tuple, read) -> "LazyWeight":
        """The weight behind ``nodes``: described now, its values read only if a kernel is packed.

        ``read()`` gives a QuantWeight or DenseWeight. The reading that describes the weight is
        kept for packing while the machine has memory to spare (``LazyWeight.get``). Only the
        description is memoized on the model, so later graphs of the model, whose tunings are
        memoized too, never read or hold the codes again.
        """
        self.keep.update(n for n in nodes if isinstance(n, fx.Node))  # readable until materialize
        kept = []

        def describe():
            weight = read()
            if _worth_keeping():
                kept.append(weight)
            return _describe(weight)

        shape = self.memo(nodes, ("describe",) + key, describe)
        return LazyWeight(*shape, read=read, value=kept[0] if kept else None)

    def emit_quant_linear(self, before: fx.Node, x: fx.Node, weight: "LazyWeight", spec, bias: fx.Node | None,
                          sources: list, pattern: str, variant: str, anchor: fx.Node) -> fx.Node:
        """Insert ``zen.quant_linear`` for ``weight``, still without kernels, and record the match.

        Kernels are chosen and weights packed by ``materialize`` after every family has run, so a
        linear that concat_linear merges is never tuned or packed on its own. ``sources``: the graph
        nodes the weight and bias were read from (for sharing across graphs). Raises ``NoKernel``
        when no kernel supports ``spec`` at all."""
        kernels, excluded = candidates(spec)
        if not kernels:
            raise NoKernel("; ".join(f"{k}: {r}" for k, r in excluded.items()))
        with self.graph.inserting_before(before):
            fused = self.graph.call_function(quant_linear, (x, [], [], bias, Plan(spec, (), (PENDING,)).encode()))
        fused.meta.update({k: v for k, v in before.meta.items() if k in ("stack_trace", "nn_module_stack", "source_fn_stack")})
        x_val = x.meta.get("val")
        if x_val is not None:
            fused.meta["val"] = x_val.new_empty((x_val.shape[0], spec.out_n))
        match = self.record.match(pattern, variant, anchor, "zen.quant_linear")
        fused.meta["zen_quant"] = PendingLinear(weight, spec, bias, list(sources), match)
        return fused

    def materialize(self) -> None:
        """Tune and pack every pending ``zen.quant_linear``; the graph then holds only packed weights.

        The largest weights first: reading, verifying and packing one makes full-size fp32
        temporaries (4.2 GB each for an 8B model's output layer), best met while the packings and
        copies of the others do not exist yet; the bf16 copies, bounded by memory_reserve, come
        after them."""
        nodes = [node for node in self.graph.find_nodes(op="call_function", target=quant_linear)
                 if isinstance(node.meta.get("zen_quant"), PendingLinear) and not node.args[1]]
        nodes.sort(key=lambda node: -node.meta["zen_quant"].spec.n * node.meta["zen_quant"].spec.k)
        pendings = [node.meta["zen_quant"] for node in nodes]
        _drop_readings_if_short(pendings)
        # a bf16 copy must leave room for the packings still to come: copies checked against
        # memory_reserve alone took an 8B model's compile to 1 GB short of the machine's 24
        forecast = PackingForecast([p.spec for p in pendings])
        for node, pending in zip(nodes, pendings):
            spec, bias = pending.spec, pending.bias
            ahead = forecast.after(spec)
            bias_value = self.evaluate(bias) if bias is not None and bias in self.constants else None
            if bias_value is not None:  # frozen as the packed weight is: its value now, whatever the model's becomes
                bias_value = bias_value.clone()
            x_val = node.args[0].meta.get("val")
            rows = x_val.shape[0] if x_val is not None and isinstance(x_val.shape[0], int) else None
            try:
                tuning = self.memo(pending.sources, ("tune", spec, rows),
                                   lambda: self.tuner.plan(spec, pending.weight.get(), bias_value, ahead, rows,
                                                           self._packed_before(pending.sources, spec),
                                                           self._storages(pending.sources)))
            except NoKernel as e:
                self._run_dequantized(node, pending, bias_value, str(e))
                pending.weight.release()
                continue
            forecast.packed(spec, tuning)
            if not self._call_native_directly(node, tuning, bias_value):
                self._call_plan(node, tuning, bias_value)
            pending.weight.release()  # packed: its reading, and the readings it was made of, are needed no more
            _drop_readings_if_short(pendings)
            pending.match.kernels.update({r.bin: r.winner for r in tuning.bins})  # a dict matches may share
            self.record.autotune.append({
                "source": pending.match.source, "kind": spec.kind, "n": spec.n, "k": spec.k,
                "excluded": tuning.excluded,
                "bins": [{"bin": r.bin, "winner": r.winner, "times_us": r.times_us, "excluded": r.excluded,
                          "cached": r.from_cache, "note": r.note, "seconds": r.seconds,
                          "activations": _activations(r.winner, spec)} for r in tuning.bins],
            })

    def _call_plan(self, node: fx.Node, tuning, bias_value) -> dict:
        """``zen.quant_linear`` with the packed weights of every kernel of its plan: it picks one by
        the rows of x at run time. Returns the constants made: id of a packed tensor -> its node."""
        plan = tuning.plan
        read = {name: tuning.packed[name][:KERNELS[name].reads or None] for name in plan.kernels}
        packed = [t for name in plan.kernels for t in read[name]]
        counts = [len(read[name]) for name in plan.kernels]
        shared: dict = {}  # kernels that keep the same tensor (e.g. the int8 codes) share one constant
        nodes = [shared.get(id(t)) or shared.setdefault(id(t), self.add_constant(t, node, "quant_linear")) for t in packed]
        bias = self.add_constant(bias_value, node, "quant_linear_bias") if bias_value is not None else node.args[3]
        node.args = (node.args[0], nodes, counts, bias, plan.encode())
        return shared

    def _call_native_directly(self, node: fx.Node, tuning, bias_value) -> bool:
        """Where the rows of x are fixed (Dynamo specializes a decode step's M = 1) and their bin's
        kernel is one of our C++ entries, replace ``zen.quant_linear`` by that entry's direct call:
        no plan lookup and no Python between Inductor's wrapper and the kernel. Where they are not
        fixed but may be one (an ahead-of-time program serving a prompt and every decode step),
        ``zen.quant_linear.by_rows`` makes the same call for one row and follows the plan for more."""
        x = node.args[0]
        rows = x.meta["val"].shape[0] if "val" in x.meta else None
        fixed = isinstance(rows, int)
        one_row = rows is not None and not fixed and may_be_one(rows, self.ahead_of_time)
        spec = tuning.plan.spec
        name = tuning.plan.kernel_for(1 if one_row else rows) if fixed or one_row else ""
        kernel = KERNELS.get(name)
        if (not config.native_direct_calls or kernel is None or not isinstance(kernel.run, NativeLinear)
                or spec.epilogue not in ("",) + kernel.epilogues or native.unavailable(kernel.native)):
            return False
        call = kernel.run.call(tuning.packed[name], spec)
        held = self._call_plan(node, tuning, bias_value) if one_row else {}  # the plan's call, the entry's beside it
        weight = [held.get(id(t)) or self.add_constant(t, node, "native_linear") for t in call.weight]
        bias = node.args[3]
        if bias_value is not None:
            bias = self.add_constant(bias_value.to(torch.float32).contiguous(), node, "native_bias")
        native_args = (weight, bias, kernel.native, spec.n, list(call.dims), list(call.extra), spec.epilogue == "swiglu")
        if one_row:
            node.target, node.args = linear_by_rows, (*node.args, *native_args)
            return True
        residual = node.kwargs.get("residual")
        fuse_residual = residual is not None and not spec.epilogue and tuple(residual.meta["val"].shape) == (rows, spec.out_n)
        with self.graph.inserting_before(node):
            direct = self.graph.call_function(native_linear, (x, *native_args), {"residual": residual} if fuse_residual else {})
            direct.meta.update(node.meta)
            direct.meta["val"] = x.meta["val"].new_empty((rows, spec.out_n), dtype=torch.float32 if fuse_residual else
                                                         x.meta["val"].dtype)
            out = direct if residual is None or fuse_residual else emit_op(self.graph, torch.ops.aten.add.Tensor, residual, direct)
        node.replace_all_uses_with(out)
        self.graph.erase_node(node)
        return True

    def _run_dequantized(self, node: fx.Node, pending: "PendingLinear", bias_value, reason: str) -> None:
        """Every candidate failed verification: a plain GEMM on the dequantized weight, correct."""
        spec = pending.spec
        w = pending.weight.get().dequantize(spec.act_dtype)
        bias = pending.bias
        if spec.epilogue == "swiglu":  # back to [gate; up] rows, and the epilogue as graph ops
            plain = swiglu_row_order(spec.out_n).argsort()
            w = w[plain]
            bias_value = bias_value[plain] if bias_value is not None else None
        if bias_value is not None:
            bias = self.add_constant(bias_value.contiguous(), node, "dequantized_bias")
        weight = self.add_constant(w.t().contiguous(), node, "dequantized")
        x = node.args[0]
        with self.graph.inserting_before(node):
            mm = (self.graph.call_function(torch.ops.aten.addmm.default, (bias, x, weight)) if bias is not None
                  else self.graph.call_function(torch.ops.aten.mm.default, (x, weight)))
            mm.meta.update(node.meta)
            mm.meta["val"] = x.meta["val"].new_empty((x.meta["val"].shape[0], spec.n))  # not the op's: a swiglu or fp32 sum
            if spec.epilogue == "swiglu":
                out = _swiglu_ops(self.graph, mm, spec.out_n)
            else:
                out = mm
            if node.kwargs.get("residual") is not None:  # residual_add's sum, as the op computes it (fp32)
                out = emit_op(self.graph, torch.ops.aten.add.Tensor, node.kwargs["residual"], out)
        node.replace_all_uses_with(out)
        self.graph.erase_node(node)
        self.record.unmatch(pending.match)
        self.record.near_miss(pending.match.pattern, mm, f"{reason}; runs as a GEMM on the dequantized weight")


def _worth_keeping() -> bool:
    """Whether a reading may be kept for packing (memory above KEEP_READINGS_RESERVE); where not,
    the heap readings freed goes back to the OS now."""
    if memory_short_of(0, KEEP_READINGS_RESERVE) is None:
        return True
    release_freed_memory()
    return False


def _drop_readings_if_short(pendings: list) -> None:
    """Below KEEP_READINGS_RESERVE, the readings kept for packing go, and the heap with them."""
    if memory_short_of(0, KEEP_READINGS_RESERVE) is not None:
        for pending in pendings:
            pending.weight.release()
        release_freed_memory()


def _activations(winner: str, spec) -> str:
    """What the bin's kernel does to the activations, said against what the model does."""
    kernels = [KERNELS[name].activations for name in winner.removeprefix(LAZY).split("+") if name in KERNELS]
    done = " or ".join(sorted(set(kernels))) or "?"
    return f"{done} (the model: int8 per row)" if spec.dynamic_activation else done


def emit_op(graph: fx.Graph, target, *args) -> fx.Node:
    """``target(*args)`` inserted at the graph's insertion point, with its fake value (shapes,
    symbolic ones included) computed from its inputs' for Inductor."""
    node = graph.call_function(target, args)
    vals = [a.meta.get("val") if isinstance(a, fx.Node) else a for a in args]
    if all(v is not None for a, v in zip(args, vals) if isinstance(a, fx.Node)):
        node.meta["val"] = target(*vals)
    return node


def _swiglu_ops(graph: fx.Graph, y: fx.Node, width: int) -> fx.Node:
    """``silu(y[:, :width]) * y[:, width:]`` as aten ops, silu in fp32 as Inductor decomposes it."""
    aten, convert = torch.ops.aten, torch.ops.prims.convert_element_type.default
    call = functools.partial(emit_op, graph)
    gate = call(convert, call(aten.slice.Tensor, y, 1, 0, width), torch.float32)
    up = call(convert, call(aten.slice.Tensor, y, 1, width, 2 * width), torch.float32)
    silu = call(aten.div.Tensor, gate, call(aten.add.Tensor, call(aten.exp.default, call(aten.neg.default, gate)), 1))
    return call(convert, call(aten.mul.Tensor, silu, up), y.meta["val"].dtype)


# kept readings only save reading a weight twice: past half the machine's memory they are not kept,
# which leaves room for the fp32 temporaries of the largest weight's reading and for the packings
KEEP_READINGS_RESERVE = 0.5

PENDING = "pending"  # the plan of a zen.quant_linear whose kernels are not chosen yet


@dataclass(eq=False)
class LazyWeight:
    """What a spec needs to know of a weight, and how to get its values.

    Values read are kept until ``release()`` (once the weight is packed) while the machine has
    memory to spare; past ``KEEP_READINGS_RESERVE`` they are read again at each use, one weight
    at a time, and the heap the reading freed goes back to the OS. Weights made of others
    (concat's merged weight, swiglu's reordered rows) are copies, one byte a weight: kept until
    the compile ended, an 8B model's were 7.5 GB, twice the int8 codes of its gate/up linears.
    """

    n: int
    k: int
    group_size: int
    bits: int
    symmetric: bool
    read: Callable = field(repr=False)
    parts: tuple = field(default=(), repr=False)  # the weights this one is made of
    value: object = field(default=None, repr=False)

    def get(self):
        if self.value is not None:
            return self.value
        value = self.read()
        if _worth_keeping():
            self.value = value
        return value

    def release(self) -> None:
        self.value = None
        for part in self.parts:
            part.release()


def _describe(w) -> tuple:
    return (w.n, w.k, w.group_size, w.bits, w.symmetric)


@dataclass
class PendingLinear:
    """``meta["zen_quant"]`` of a zen.quant_linear: what materialize (and concat) need."""

    weight: LazyWeight
    spec: object
    bias: Optional[fx.Node]
    sources: list
    match: object  # its record.Match, whose kernels materialize fills in


class _Memo(dict):
    """Per-weight memo; a copied model starts without it (its tensors are new anyway)."""

    def __deepcopy__(self, memo):
        return _Memo()

    def __reduce__(self):
        return (_Memo, ())


def _config_signature() -> str:
    flags = config.get_config_copy()
    flags.pop("debug_dir", None)
    return repr(sorted(flags.items()))


def _fake_mode(graph: fx.Graph):
    for node in graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch._subclasses.FakeTensor):
            return val.fake_mode
    return None


@functools.lru_cache(None)
def _source_files() -> tuple:
    """Every source file of the package (the patterns are installed from a folder of their own):
    a change to any of them is a new pass for Inductor's FX graph cache."""
    import importlib.util

    roots = [os.path.dirname(__file__), *importlib.util.find_spec("zen_inductor.patterns").submodule_search_locations]
    files = []
    for root in roots:
        for folder, _, names in sorted(os.walk(root)):
            files += sorted(os.path.join(folder, f) for f in names if f.endswith((".py", ".cpp", ".h")))
    return tuple(files)


class ZenJointPass(CustomGraphPass):
    def __init__(self, record: CompileRecord, families: tuple):
        self.record = record
        self.families = families  # patterns.FAMILIES, in the order they run

    def __deepcopy__(self, memo) -> "ZenJointPass":
        # AOTInductor compiles under a deep copy of Inductor's config: a copied pass would write
        # its matches, near misses and tuning to a copy of the record nobody reads
        return self

    def __call__(self, graph: fx.Graph) -> None:
        gm = graph.owning_module
        if config.debug_dir:  # only the dumps show them: rendering took ~0.1 s a graph
            self.record.graph_before = _readable(gm)
        params = param_values(graph)
        ahead_of_time = bool(V.aot_compilation)
        self.record.frozen = bool(params) or ahead_of_time
        if ahead_of_time:
            _drop_asserts_on_constants(graph, constant_nodes(graph, params))
        ctx = PatternContext(graph, gm, params, constant_nodes(graph, params), ConstEvaluator(gm, params), self.record,
                             ahead_of_time=ahead_of_time)
        # the joint passes run under Inductor's fake mode; our reads of real weights must not
        with torch._subclasses.fake_tensor.unset_fake_temporarily():
            for family in self.families:
                if getattr(config, family.flag):
                    family.apply(ctx)
                    # the next family must not see what this one replaced; weights not yet packed stay
                    graph.eliminate_dead_code(is_impure_node=lambda n: n in ctx.keep or n.is_impure())
                    ctx.constants = constant_nodes(graph, params) | ctx.constants.intersection(graph.nodes)
            ctx.materialize()
            ctx.keep.clear()
            fold_calls(graph, torch.ops.zen.gguf_dequantize.default, ctx.constants, ctx.evaluate, ctx.add_constant)
        for node in graph.nodes:  # PendingLinear meta served concat_linear and materialize only
            node.meta.pop("zen_quant", None)
        graph.eliminate_dead_code()
        native.settle()  # Inductor's code generation, next, needs the vector ISA check started in the background
        if ctx._attr_count:
            # as freeze() marks its graphs: the FX graph cache then stores our constants' names
            # and takes their values from this module on a hit, not a pickled copy of the first
            # model's weights (their cache key holds metadata only)
            record_has_frozen_params(gm)
        gm.recompile()
        if config.debug_dir:
            self.record.graph_after = _readable(gm)

    def uuid(self) -> bytes:
        # Inductor's FX graph cache keys on this: any change to our code or flags misses.
        return get_hash_for_files(_source_files(), extra=repr(sorted(config.get_config_copy().items())))


def _drop_asserts_on_constants(graph: fx.Graph, constants: set) -> None:
    """torch.export checks the dtype of what ``.to()`` returned at run time
    (``aten._assert_tensor_metadata``); an impure node, it would keep every weight's dequant
    chain alive after our replacement. On a constant it holds by construction: drop it."""
    for node in graph.find_nodes(op="call_function", target=torch.ops.aten._assert_tensor_metadata.default):
        if node.args and node.args[0] in constants:
            graph.erase_node(node)


def _readable(gm: fx.GraphModule) -> str:
    try:
        return gm.print_readable(print_output=False, include_stride=False, include_device=False, colored=False)
    except Exception:
        return str(gm.graph)
