"""``torch.compile(model, backend="zen")``: Inductor with our passes, for this compile only.

    Dynamo graph
      -> lift parameters to graph attributes (so AOTAutograd hands their values to our pass)
      -> compile_fx(config_patches={joint_custom_post_pass: ZenJointPass})
           joint passes (ours: match, check, prepack, replace) -> post-grad -> lowering
      -> dumps + one-line summary
Our pass freezes what it reads: packed weights become constants marked as frozen parameters.
Inductor's own freezing runs after it only with ``config.inductor_freezing``.
Nothing global is touched: Inductor settings go through ``config_patches``, ours through
``config.patch``, and both end with the compile.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import operator
import unittest.mock
import warnings

import torch
import torch._functorch.config
import torch.fx as fx
from torch._dynamo.aot_compile_types import SerializableCallable
from torch._inductor.compile_fx import compile_fx

from . import config, dumps, native, wrapper_calls  # noqa: F401  wrapper_calls: our ops' lowerings
from .allocator import reuse_freed_memory
from .graph_pass import ZenJointPass
from .patterns import FAMILIES
from .record import CompileRecord

log = logging.getLogger("zen_inductor")

_graph_ids = itertools.count()


def _split_options(options: dict | None) -> tuple[dict, dict]:
    ours, inductor = {}, {}
    for key, value in (options or {}).items():
        (ours if key in config._config else inductor)[key] = value
    return ours, inductor


def zen(gm: fx.GraphModule, example_inputs, *, mode=None, options=None):
    ours, inductor_patches = _split_options(options)
    native.check_toolchain()
    if mode not in (None, "default"):
        inductor_patches.update(torch._inductor.list_mode_options(mode))
    def compile_for(inputs, static=None):
        with config.patch(ours):
            return _compile(gm, list(inputs), inductor_patches, compile_for, static)

    return compile_for(example_inputs)


def _compile(gm, example_inputs, inductor_patches, compile_for, static=None):
    record = CompileRecord(graph_name=f"graph_{next(_graph_ids)}")
    freeze = config.freezing and not torch.is_grad_enabled()
    if config.freezing and torch.is_grad_enabled():
        warnings.warn(
            "zen: grad mode is on, so weights cannot be frozen and quantized linears are left to "
            "Inductor; run the compiled model under torch.no_grad() or torch.inference_mode()",
            stacklevel=3,
        )
    lifted = []
    if freeze:
        gm = _copy_for_lifting(gm)  # Dynamo calls us with the inputs of *its* graph; keep that intact
        lifted = _lift_parameters(gm, example_inputs, static)
    inputs = [a for i, a in enumerate(example_inputs) if i not in set(lifted)]
    patches = {**inductor_config_patches(record), "freezing": freeze and config.inductor_freezing, **inductor_patches}
    with reuse_freed_memory(), _constants_allowed(inputs), torch._functorch.config.patch(enable_autograd_cache=False):
        # AOTAutograd's cache would serve a warm compile without running our pass, and the packed
        # weights live only in what our pass builds (it never caches a frozen graph for this reason)
        compiled = compile_fx(gm, inputs, config_patches=patches)
    _forget_zentorch_reorders()
    dumps.finish(record)
    if lifted:
        # measured on qwen3-4l decode: guards 1.13 -> 0.61 ms a call, 9.7 -> 8.3 ms a token
        log.info("zen: %d parameters came in as graph inputs (Inductor's global freezing flag was off while "
                 "Dynamo traced), so Dynamo checks each one's metadata on every call; "
                 "torch._inductor.config.freezing = True before compiling lets it guard them by identity", len(lifted))
    return ZenCompiled(compiled, example_inputs, lifted, compile_for)


def inductor_config_patches(record: CompileRecord) -> dict:
    """What any compile of ours sets in Inductor's config, for that compile only: our pass, and
    the per-call size asserts as ``config.runtime_size_asserts`` says."""
    return {"joint_custom_post_pass": ZenJointPass(record, FAMILIES), "size_asserts": config.runtime_size_asserts,
            "alignment_asserts": config.runtime_size_asserts}


class ZenCompiled(SerializableCallable):
    """A graph compiled by zen: Inductor's callable, given the graph's inputs less the parameters
    zen froze into it.

    Dynamo's ahead-of-time compile (``torch._dynamo.aot_compile``, which vLLM uses by default)
    accepts only a backend result that says how it would be saved. Ours cannot be: its constants
    are weights packed for this CPU at compile time, and its kernels were chosen by timing them
    here. Saving raises, with the reason; callers that cache compiled graphs (vLLM does) log it and
    compile again in the next process.
    """

    def __init__(self, compiled, inputs: list, lifted: list[int], compile_for):
        self.compiled = compiled
        # positions of the inputs Inductor's graph still takes; None: all
        self.keep = [i for i in range(len(inputs)) if i not in set(lifted)] if lifted else None
        # Where Dynamo passed the parameters as inputs (Inductor's global freezing flag off while
        # it traced), it also reuses this graph for another module of the same class, whose
        # weights are not the ones frozen into it: a second model compiled in the process
        # returned the first one's outputs (-3 dB). Each frozen tensor carries this graph's token
        # (no reference to it is held, so the model stays free to go); a call with tensors
        # without it compiles a graph of their own.
        self.lifted, self.compile_for = lifted, compile_for
        self.token = object()
        for i in lifted:
            inputs[i].__dict__.setdefault("_zen_frozen_in", set()).add(self.token)
        self.others: list = []  # graphs compiled for other modules' weights

    def __call__(self, *args):
        if self.keep is None:
            return self.compiled(*args)
        if not self._frozen_here(args):
            return self._for_other_weights(args)(*args)
        return self.compiled(*[args[i] for i in self.keep])

    def _frozen_here(self, args) -> bool:
        token = self.token
        return all(token in getattr(args[i], "_zen_frozen_in", ()) for i in self.lifted)

    def _for_other_weights(self, args) -> "ZenCompiled":
        for other in self.others:
            if other._frozen_here(args):
                return other
        if len(self.others) >= MOST_MODULES_A_GRAPH:
            raise RuntimeError(
                f"zen: one graph called with the weights of {len(self.others) + 2} modules; each needs a compile "
                "of its own (their weights are frozen into it). Set torch._inductor.config.freezing = True before "
                "compiling: Dynamo then tells the modules apart itself")
        log.info("zen: a graph compiled for one module's weights is called with another's (Dynamo reuses it for "
                 "modules of one class while Inductor's global freezing flag is off); compiling it for these weights")
        self.others.append(self.compile_for(args, self.lifted))
        return self.others[-1]

    @classmethod
    def serialize_compile_artifacts(cls, fn) -> bytes:
        raise NotImplementedError(
            "zen's compiled graphs are not saved: they hold weights packed for this CPU when they were compiled; "
            "each process compiles its own")

    @classmethod
    def deserialize_compile_artifacts(cls, data: bytes):
        raise NotImplementedError("zen's compiled graphs are not saved, so none can be loaded")


# graphs one Dynamo graph compiles into for modules of one class (Dynamo's own recompile limit is 8)
MOST_MODULES_A_GRAPH = 8


def _constants_allowed(inputs):
    """Inductor's fake-tensor passes meet our packed weights as real tensors (get_attr constants).
    Its own freezing compiles with this compile's fake mode accepting them; so do we, for this
    compile only."""
    fake_mode = torch._guards.detect_fake_mode(inputs)
    if fake_mode is None:
        return contextlib.nullcontext()
    return unittest.mock.patch.object(fake_mode, "allow_non_fake_inputs", True)


def _copy_for_lifting(gm: fx.GraphModule) -> fx.GraphModule:
    env: dict = {}
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, env))
    copy = fx.GraphModule(gm, graph)
    copy.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        copy._param_name_to_source = dict(gm._param_name_to_source)
    for old, new in env.items():
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    return copy


def _lift_parameters(gm: fx.GraphModule, example_inputs, static: list[int] | None = None) -> list[int]:
    """Turn placeholders that hold module parameters/buffers into attributes of ``gm``.

    Dynamo makes parameters graph attributes only if Inductor's *global* ``freezing`` flag was
    on while it traced; otherwise they arrive here as inputs and AOTAutograd/freezing treat them
    as activations. Lifting them here gives freezing its constants without touching globals.
    Dynamo marks such inputs static (``_dynamo_static_input_type``); that mark is the test, or
    ``static``: the positions a compile of the same graph for another module's weights found.
    """
    lifted = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        marked = hasattr(value, "_dynamo_static_input_type") if static is None else i in static
        if not isinstance(value, torch.Tensor) or not marked:
            continue
        if _mutated(node):  # a KV cache marked static is state, not a weight
            continue
        name = f"_zen_lifted_{i}"
        if isinstance(value, torch.nn.Parameter):
            gm.register_parameter(name, value)
        else:
            gm.register_buffer(name, value)
        if hasattr(gm, "_param_name_to_source"):  # AOTAutograd maps attributes back to Dynamo sources
            gm._param_name_to_source[name] = getattr(node, "_dynamo_source", None)
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(name)
        # without Dynamo's GraphArg: it holds a weak reference to the parameter, a tensor with one
        # cannot be swapped, and swapping is how ``model.to(dtype)`` moves a torchao weight (the
        # graph's name table keeps even an erased node, so the placeholder drops it too)
        node.meta.pop("grapharg", None)
        attr.meta.update(node.meta)
        node.replace_all_uses_with(attr)
        gm.graph.erase_node(node)
        lifted.append(i)
    if lifted:
        gm.recompile()
    return lifted


def _mutated(node: fx.Node) -> bool:
    for user in node.users:
        if getattr(user.target, "__module__", None) == "_operator":
            # ``operator.and_`` is ``a & b``, not in place (a GGUF file's nibbles were taken for
            # state by it); the in-place operators are ``iand``, ``iadd``, ...
            if user.target in _INPLACE_OPERATORS:
                return True
            continue
        name = user.target if isinstance(user.target, str) else getattr(user.target, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):
            return True
    return False


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
                      operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
                      operator.imatmul, operator.iconcat}


def _forget_zentorch_reorders():
    # ZenDNN caches reordered weights by data pointer; a new model's packed weight can land at a
    # freed model's address and be served the old reorder. Dropping the cache at every compile
    # makes each compiled model start clean.
    import sys

    if "zentorch" in sys.modules:
        try:
            sys.modules["zentorch"]._C.clear_weight_cache()
        except (AttributeError, RuntimeError) as e:  # a zentorch without the cache, or one that failed to load
            log.debug("zen: zentorch's weight cache was not cleared: %s", e)
