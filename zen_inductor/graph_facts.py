"""Facts of an FX graph that the passes and the weight reader both read: the ops that only view or
convert, a node's fake value, what a call is called with, whether a size may be one, a matmul's
operands, the cache under transformers' repeat_kv."""
import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten

# the ops the families look through: shape-only views between a linear and its users, and dtype
# conversions (decomposed or not)
VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
CONVERTS = (torch.ops.prims.convert_element_type.default, aten._to_copy.default)
# the matmuls a linear becomes: op -> positions of (activation, weight [K, N], bias)
MATMULS = {aten.mm.default: (0, 1, None), aten.addmm.default: (1, 2, 0)}


def fake_value(node):
    """The fake tensor (shape, dtype) Inductor recorded for ``node``; None for constants and
    nodes without one."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def is_call(node, *targets) -> bool:
    """``node`` is a call of one of ``targets``."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def call_arg(node, index: int, name: str, default):
    """Argument ``name`` of a call, given by position ``index`` or by keyword."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def may_be_one(size, ahead_of_time: bool = False) -> bool:
    """Whether a size may be 1 when the graph runs. Dynamo specializes sizes 0 and 1, so its
    dynamic sizes range from 2. An export may let one start at 1 (one ahead-of-time program for a
    prompt and every decode step), but AOTInductor traces the program again with every dynamic
    size from 2, whatever the export said: there (``ahead_of_time``) any dynamic size may be 1."""
    if isinstance(size, int):
        return size == 1
    return ahead_of_time or size.node.shape_env.bound_sympy(size.node.expr).lower <= 1


def matmul_operands(mm) -> tuple:
    """(activation, weight [K, N], bias or None) of a matmul in MATMULS. Read them when rewriting:
    the rewrite of the linear before may have replaced the activation (two linears back to back)."""
    xi, wi, bi = MATMULS[mm.target]
    return mm.args[xi], mm.args[wi], (mm.args[bi] if bi is not None else None)


# ops that change how a tensor is viewed, not its values (a clone is the copy repeat_kv's reshape
# makes of its expanded input)
_SAME_VALUES = (*VIEWS, aten.clone.default)


def _full_slice(node) -> bool:
    return (isinstance(node, fx.Node) and node.target is aten.slice.Tensor
            and statically_known_true(fake_value(node).shape == fake_value(node.args[0]).shape))


def under_full_slices(node):
    while _full_slice(node):
        node = node.args[0]
    return node


def before_repeat_kv(node: fx.Node, heads: int) -> fx.Node:
    """The [B, Hkv, L, D] cache tensor that transformers' ``repeat_kv`` expanded to ``heads`` heads
    (``x[:, :, None].expand(B, Hkv, G, L, D).reshape(B, Hkv * G, L, D)``), or ``node`` itself.

    The attention replacements group the query heads by KV head, so they read the cache once per
    KV head: given the expanded copy, the graph wrote G copies of every layer's K and V at every
    step and the kernels read all of them (at 576 positions the decode kernel took 61 us a call in
    the step against 24 on the cache itself)."""
    n = node
    while isinstance(n, fx.Node) and (n.target in _SAME_VALUES or _full_slice(n)):
        n = n.args[0]
    if not (isinstance(n, fx.Node) and n.target is aten.expand.default):
        return node
    base = under_full_slices(n.args[0])
    if not (isinstance(base, fx.Node) and base.target is aten.unsqueeze.default and base.args[1] == 2):
        return node
    base = under_full_slices(base.args[0])
    expanded, source, given = fake_value(n), fake_value(base), fake_value(node)
    if expanded is None or source is None or expanded.dim() != 5 or source.dim() != 4:
        return node
    b, hkv, group, length, d = expanded.shape
    same = (source.shape[0] == b and source.shape[1] == hkv and source.shape[3] == d and isinstance(hkv, int)
            and isinstance(group, int) and hkv * group == heads)
    if not same or not statically_known_true(source.shape[2] == length) or not statically_known_true(given.shape[2] == length):
        return node
    return base


def kv_before_repeat_kv(k: fx.Node, v: fx.Node, heads: int) -> tuple:
    """``(k, v)`` both through ``before_repeat_kv``, or both as given where only one could be."""
    k_base, v_base = before_repeat_kv(k, heads), before_repeat_kv(v, heads)
    if fake_value(k_base).shape[1] != fake_value(v_base).shape[1]:
        return k, v
    return k_base, v_base
