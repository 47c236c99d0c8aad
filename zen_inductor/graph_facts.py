"""Facts of an FX graph that the passes and the weight reader both read: the ops that only view or
convert, a node's fake value, what a call is called with, a matmul's operands."""
import torch
import torch.fx

# the ops the families look through: shape-only views between a linear and its users, and dtype
# conversions (decomposed or not)
VIEWS = (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default)
CONVERTS = (torch.ops.prims.convert_element_type.default, torch.ops.aten._to_copy.default)
# the matmuls a linear becomes: op -> positions of (activation, weight [K, N], bias)
MATMULS = {torch.ops.aten.mm.default: (0, 1, None), torch.ops.aten.addmm.default: (1, 2, 0)}


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


def matmul_operands(mm) -> tuple:
    """(activation, weight [K, N], bias or None) of a matmul in MATMULS. Read them when rewriting:
    the rewrite of the linear before may have replaced the activation (two linears back to back)."""
    xi, wi, bi = MATMULS[mm.target]
    return mm.args[xi], mm.args[wi], (mm.args[bi] if bi is not None else None)
