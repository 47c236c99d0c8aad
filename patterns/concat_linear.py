"""concat_linear: linears that read the same input become one GEMM and a split.

Matches (joint graph, after dequant_matmul)::

    q = zen.quant_linear(view(h), Wq...)      k = zen.quant_linear(view(h), Wk...)     ...
    q = mm(view(h), permute(Wq))              k = mm(view(h), permute(Wk))             (bf16/fp32)

with the same ``h`` (the views are separate until freezing's CSE) and K. Quantized weights merge
when they agree in bits, group size, activation dtype and activation quantization; they are
concatenated along N *before* packing, so the merged linear is tuned and packed like any other.
Dense weights merge into one constant. Linears that share an input but not a format are left
apart and reported as a near miss.

Replacement: one linear on the concatenated weight, ``split_with_sizes`` back into the parts.
One count per merged group, whatever its width (q/k/v is one, gate/up is one).
"""
from __future__ import annotations

import collections
import operator

import torch
import torch.fx as fx

from zen_inductor.record import NoKernel
from zen_inductor.graph_pass import LazyWeight, PendingLinear
from zen_inductor.kernels import LinearSpec, QuantWeight, quant_linear

from zen_inductor.graph_facts import MATMULS, VIEWS, fake_value, matmul_operands

from .family import Family
from zen_inductor.weight_reading import find_codes

aten = torch.ops.aten

PATTERN = "concat_linear"


def _root(node: fx.Node) -> fx.Node:
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in VIEWS:
        node = node.args[0]
    return node


def _order(graph):
    return {n: i for i, n in enumerate(graph.nodes)}


# --- search -----------------------------------------------------------------------------------


def search(ctx):
    """Groups of linears on one input: (kind, [nodes]) with kind "quant" or "dense"."""
    groups = collections.defaultdict(list)
    for node in ctx.graph.find_nodes(op="call_function", target=quant_linear):
        if isinstance(node.meta.get("zen_quant"), PendingLinear):
            groups["quant", _root(node.args[0])].append(node)
    dense = [node for target in MATMULS for node in ctx.graph.find_nodes(op="call_function", target=target)]
    for node in dense:
        x, w, _ = matmul_operands(node)
        if (w in ctx.constants and x not in ctx.constants and fake_value(w) is not None and fake_value(w).dtype.is_floating_point
                and find_codes(w) is None):  # a dequant chain dequant_matmul left must stay quantized
            groups["dense", _root(x)].append(node)
    order = _order(ctx.graph)
    for (kind, _), nodes in groups.items():
        if len(nodes) > 1:
            yield kind, sorted(nodes, key=order.__getitem__)


# --- constraints --------------------------------------------------------------------------------


def compat_key(spec: LinearSpec) -> tuple:
    return (spec.k, spec.bits, spec.group_size if spec.group_size != spec.k else "per_channel", spec.act_dtype, spec.dynamic_activation)


_KEY_FIELDS = ("K", "bits", "group size", "activation dtype", "activation quantization")


def _difference(a: tuple, b: tuple) -> str:
    return ", ".join(f"{f} ({x} vs {y})" for f, x, y in zip(_KEY_FIELDS, a, b) if x != y)


# --- rewrite ------------------------------------------------------------------------------------


def _split(ctx, merged: fx.Node, parts: list[fx.Node], sizes: list[int]) -> None:
    with ctx.graph.inserting_after(merged):
        split = ctx.graph.call_function(aten.split_with_sizes.default, (merged, sizes, 1))
    split.meta["val"] = [fake_value(p) for p in parts]
    last = split
    for i, part in enumerate(parts):
        with ctx.graph.inserting_after(last):
            item = ctx.graph.call_function(operator.getitem, (split, i))
        item.meta.update(part.meta)
        part.replace_all_uses_with(item)
        last = item


def merge_quant(ctx, nodes: list[fx.Node]) -> None:
    parts = [n.meta["zen_quant"] for n in nodes]
    sources = [src for p in parts for src in p.sources]

    def read() -> QuantWeight:  # only if the merged linear is not tuned already
        return QuantWeight.concat([p.weight.get() for p in parts])

    first = parts[0].weight
    weight = LazyWeight(n=sum(p.weight.n for p in parts), k=first.k, group_size=first.group_size,
                        bits=max(p.weight.bits for p in parts), symmetric=all(p.weight.symmetric for p in parts),
                        read=read, parts=tuple(p.weight for p in parts))
    s0 = parts[0].spec
    spec = LinearSpec(n=weight.n, k=weight.k, group_size=weight.group_size, bits=weight.bits,
                      symmetric=weight.symmetric, act_dtype=s0.act_dtype, dynamic_activation=s0.dynamic_activation)
    bias = None
    biases = [p.bias for p in parts]
    if any(b is not None for b in biases):
        values = [ctx.evaluate(b) if b is not None else torch.zeros(p.spec.n, dtype=p.spec.act_dtype) for b, p in zip(biases, parts)]
        bias = ctx.add_constant(torch.cat(values).contiguous(), nodes[0], "concat_bias")
    merged = ctx.emit_quant_linear(nodes[0], nodes[0].args[0], weight, spec, bias, sources,
                                   PATTERN, f"{len(nodes)}way_{spec.kind}", nodes[0])
    _split(ctx, merged, nodes, [p.spec.n for p in parts])
    for p in parts:
        p.match.replacement = f"merged by concat_linear ({len(nodes)}-way)"


def merge_dense(ctx, nodes: list[fx.Node]) -> None:
    args = [matmul_operands(n) for n in nodes]
    weights = [ctx.evaluate(w) for _, w, _ in args]  # each [K, N_i] as mm sees it
    if len({(w.dtype, w.shape[0]) for w in weights}) != 1:
        ctx.record.near_miss(PATTERN, nodes[0], "linears read the same input but their weights differ in dtype or K; left apart")
        return
    merged_weight = ctx.memo([w for _, w, _ in args], ("concat_dense",), lambda: torch.cat([w.t() for w in weights]).contiguous())
    cat = ctx.add_constant(merged_weight, nodes[0], "concat_weight")
    bias = None
    if any(b is not None for _, _, b in args):
        parts = [ctx.evaluate(b) if b is not None else torch.zeros(w.shape[1], dtype=w.dtype) for (_, _, b), w in zip(args, weights)]
        bias = ctx.add_constant(torch.cat(parts).contiguous(), nodes[0], "concat_bias")
    x = args[0][0]
    with ctx.graph.inserting_before(nodes[0]):
        weight_kn = ctx.graph.call_function(aten.permute.default, (cat, [1, 0]))
        if bias is None:
            merged = ctx.graph.call_function(aten.mm.default, (x, weight_kn))
        else:
            merged = ctx.graph.call_function(aten.addmm.default, (bias, x, weight_kn))
    weight_kn.meta["val"] = fake_value(cat).permute(1, 0)
    x_val = fake_value(x)
    merged.meta.update({k: v for k, v in nodes[0].meta.items() if k in ("stack_trace", "nn_module_stack")})
    merged.meta["val"] = x_val.new_empty((x_val.shape[0], sum(w.shape[1] for w in weights)))
    _split(ctx, merged, nodes, [w.shape[1] for w in weights])
    ctx.record.match(PATTERN, f"{len(nodes)}way_dense_{str(weights[0].dtype).replace('torch.', '')}", nodes[0], "aten.mm + split" if bias is None else "aten.addmm + split", {})


def apply(ctx) -> None:
    for kind, nodes in list(search(ctx)):
        if kind == "dense":
            merge_dense(ctx, nodes)
            continue
        by_key = collections.defaultdict(list)
        for node in nodes:
            by_key[compat_key(node.meta["zen_quant"].spec)].append(node)
        keys = list(by_key)
        for key in keys[1:]:
            ctx.record.near_miss(
                PATTERN, by_key[key][0],
                f"{len(nodes)} linears read the same input but their weights differ in {_difference(keys[0], key)}; left apart",
            )
        for key, group in by_key.items():
            if len(group) > 1:
                try:
                    merge_quant(ctx, group)
                except NoKernel as e:
                    ctx.record.near_miss(PATTERN, group[0], f"no kernel for the merged weight: {e}")


FAMILY = Family(PATTERN, "concat_linear", apply)
