"""dequant -> matmul: a linear whose weight is dequantized in the graph runs on a quantized kernel.

Matches (joint graph, weights still placeholders)::

    codes  = <int weight param, possibly unpacked with shifts/masks, possibly viewed [N, K/G, G]>
    w      = layout/affine ops of convert(codes, float)      # e.g. (codes - zp) * scale, view, permute
    y      = mm(x, w) | addmm(bias, x, w) [| mul(y, scale_per_column)]

which covers torchao IntxWeightOnly (int4/int8, sym/asym, per-group/per-channel), Int8WeightOnly
(scale applied after the mm), hand-written dequant code, and GPTQ-style int4 packed in int32.

The chain is not matched op by op. It is *read* on the real weights: with the float codes replaced
by 0 and by 1 the chain gives the offset and the scale of every weight element, so any affine
dequant is understood, whatever its spelling; two probes suffice because the chain's ops prove it
affine in the codes (no code as a divisor). The group size is where scale and offset are constant
along K.

Constraints (each failure is a near miss with its reason): weights frozen; activations bf16 or
fp32; codes fit 8 bits; the chain is affine in the codes; some kernel that keeps the weight
quantized supports the shape (else Inductor's own code is as good).

Replacement: ``zen.quant_linear(x, packed, counts, bias, plan)``; candidates come from the kernel
registry, one per shape bin, chosen by the autotuner.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from zen_inductor.verification import sqnr_db
from zen_inductor.graph_facts import CONVERTS, MATMULS, VIEWS, fake_value, is_call, matmul_operands
from zen_inductor.kernels import KERNELS, LinearSpec, QuantWeight, Unsuited, candidates
from zen_inductor.record import PatternMiss
from zen_inductor.weight_reading import (AFFINE_OPS, LAYOUT_OPS, check_chain, describe_quantized, find_codes, is_int_to_float,
                                         read_weight)

from .family import Family

aten = torch.ops.aten
prims = torch.ops.prims

PATTERN = "dequant_matmul"


_ACT_DTYPES = (torch.bfloat16, torch.float32)


# --- search -----------------------------------------------------------------------------------


def search(ctx):
    """Yield the matmuls with a dequantized weight."""
    for target in MATMULS:
        for mm in ctx.graph.find_nodes(op="call_function", target=target):
            w = matmul_operands(mm)[1]
            if fake_value(w) is not None and find_codes(w) is not None:
                yield mm


def variant_name(spec: LinearSpec) -> str:
    gran = "per_channel" if spec.group_size == spec.k else f"group{spec.group_size}"
    return f"int{spec.bits}_{'sym' if spec.symmetric else 'asym'}_{gran}"


# --- rewrite ------------------------------------------------------------------------------------


def _post_scale(ctx, mm: fx.Node, n: int) -> fx.Node | None:
    """``mul(mm, s)`` with a constant per-column ``s``: torchao Int8WeightOnly applies its scale here."""
    if len(mm.users) != 1:
        return None
    (user,) = mm.users
    if user.target is not aten.mul.Tensor or user.args[0] is not mm:
        return None
    s = user.args[1]
    if isinstance(s, fx.Node) and s in ctx.constants and fake_value(s) is not None and fake_value(s).numel() == n and fake_value(s).shape[-1] == n:
        return user
    return None


def apply(ctx) -> None:
    for mm in list(search(ctx)):
        try:
            rewrite(ctx, mm, *matmul_operands(mm))
        except PatternMiss as miss:
            ctx.record.near_miss(PATTERN, mm, str(miss))
    for search_fn, rewrite_fn in ((search_dynamic, rewrite_dynamic), (search_int4pack, rewrite_int4pack)):
        for mm in list(search_fn(ctx)):
            try:
                rewrite_fn(ctx, mm)
            except PatternMiss as miss:
                ctx.record.near_miss(PATTERN, mm, str(miss))


def rewrite(ctx, mm, x, w, bias) -> None:
    act = fake_value(x)
    source = int8_fake_quant_source(ctx, x)
    if source is not None:  # torchao's dynamic int8 activations: the kernel quantizes x itself
        act = fake_value(source)
    if act.dtype not in _ACT_DTYPES:
        raise PatternMiss(f"{act.dtype} activations: kernels are verified for bf16 and fp32 only")
    if not ctx.frozen:
        raise PatternMiss("the weight is a graph input, not a constant: compile under torch.no_grad() with freezing on")
    n = fake_value(w).shape[1]
    post = _post_scale(ctx, mm, n)
    if post is not None and bias is not None:
        post = None  # addmm then scale: bias would be scaled too; read as a plain weight instead
    post_scale = post.args[1] if post is not None else None
    sources = [w, post_scale]
    check_chain(ctx, w)
    weight = ctx.weight(sources, ("read",), lambda: read_weight(ctx, w, post_scale))
    spec = LinearSpec(n=weight.n, k=weight.k, group_size=weight.group_size, bits=weight.bits,
                      symmetric=weight.symmetric, act_dtype=act.dtype, dynamic_activation=source is not None)
    kernels, excluded = candidates(spec)
    if not any(k.source != "torch" for k in kernels):
        reasons = "; ".join(f"{name}: {why}" for name, why in excluded.items()
                            if KERNELS[name].source not in ("torch", "dense") and not isinstance(why, Unsuited))
        raise PatternMiss(f"no kernel keeps this {variant_name(spec)} weight quantized ({reasons}); left to Inductor")
    variant = variant_name(spec)
    if source is not None:
        with ctx.graph.inserting_before(mm):
            x = ctx.graph.call_function(aten.reshape.default, (source, [-1, spec.k]))
        x.meta["val"] = act.reshape(-1, spec.k)
        variant = "da8_" + variant
    _replace(ctx, mm, post if post is not None else mm, x, bias, weight, spec, variant, sources)


# --- int8 dynamic activations in front of a dequantized weight ----------------------------------
#
# torchao Int8DynamicActivationIntxWeightConfig quantizes x and dequantizes it again in the graph
# (per row, asymmetric), then multiplies by the dequantized weight:
#     x_fq = (convert(convert_i8(clamp(round(x * (1 / s)) + zp))) - zp) * s
# The linear is matched from x itself; the kernels quantize x to int8 on a grid at least as fine
# (per row and group), or take x exactly (weight-only kernels), so no accuracy is lost.

_CLAMPS = {aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default}


def int8_fake_quant_source(ctx, x: fx.Node) -> fx.Node | None:
    """The float tensor of which ``x`` is an 8-bit quantize-dequantize, or None."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    if not isinstance(fake_value(x), torch.Tensor):
        return None
    numel = fake_value(x).numel()

    def carried(node):  # the one input that is the tensor itself; the others are per-row qparams
        ins = [a for a in node.all_input_nodes  # (sizes of dynamic shapes are inputs too: SymInts)
               if isinstance(fake_value(a), torch.Tensor) and a not in ctx.constants and statically_known_true(fake_value(a).numel() == numel)]
        return ins[0] if len(ins) == 1 else None

    node = x
    while not is_int_to_float(node):  # the dequantize half
        if node.op != "call_function" or node.target not in LAYOUT_OPS | AFFINE_OPS:
            return None
        node = carried(node)
        if node is None:
            return None
    if fake_value(node.args[0]).dtype not in (torch.int8, torch.uint8):
        return None
    node = node.args[0]
    while node.target is not aten.round.default:  # the quantize half
        if node.op != "call_function" or node.target not in LAYOUT_OPS | AFFINE_OPS | _CLAMPS:
            return None
        node = carried(node)
        if node is None:
            return None
    scaled = node.args[0]
    if not isinstance(scaled, fx.Node) or scaled.target not in (aten.mul.Tensor, aten.div.Tensor):
        return None
    source = carried(scaled)
    return source if source is not None and fake_value(source).dtype.is_floating_point else None


def _replace(ctx, anchor, out, x, bias, weight, spec, variant, sources) -> None:
    """Put ``zen.quant_linear(x, ...)`` where ``out`` was; kernels are chosen once all families ran."""
    fused = ctx.emit_quant_linear(out, x, weight, spec, bias, sources + [bias], PATTERN, variant, anchor)  # NoKernel: a near miss
    result = fused
    if fake_value(out) is not None and fake_value(out).dtype != spec.act_dtype:  # torchao's DA8 span ends in fp32
        with ctx.graph.inserting_after(fused):
            result = ctx.graph.call_function(prims.convert_element_type.default, (fused, fake_value(out).dtype))
        result.meta.update(fused.meta)
        result.meta["val"] = fake_value(out)
    out.replace_all_uses_with(result)
    if result is not fused:
        _skip_round_trips(ctx.graph, result, fused)
        if not result.users:
            ctx.graph.erase_node(result)


def _skip_round_trips(graph: fx.Graph, wide: fx.Node, narrow: fx.Node) -> None:
    """Users that only view ``wide`` (``narrow`` upcast) and convert it back read ``narrow``.

    torchao's int8 dynamic span ends in fp32 and the model converts it back to bf16 after a view:
    the kernel's bf16 result went bf16 -> fp32 -> bf16, exactly itself, and the two converts hid
    the linear from the families after this one (no SwiGLU epilogue, no residual fold for int8dq).
    """
    for user in list(wide.users):
        if fake_value(user) is None:  # nothing recorded to rebuild the view's value from
            continue
        if is_call(user, *CONVERTS) and _only_dtype(user) and fake_value(user).dtype == fake_value(narrow).dtype:
            user.replace_all_uses_with(narrow)
        elif is_call(user, *VIEWS):
            with graph.inserting_after(user):
                view = graph.call_function(user.target, (narrow, *user.args[1:]), dict(user.kwargs))
            view.meta.update(user.meta)
            view.meta["val"] = fake_value(user).to(fake_value(narrow).dtype)
            _skip_round_trips(graph, user, view)
            if not view.users:
                graph.erase_node(view)
        if not user.users:
            graph.erase_node(user)


def _only_dtype(convert: fx.Node) -> bool:
    return convert.target is prims.convert_element_type.default or set(convert.kwargs) <= {"dtype"}


# --- int8 dynamic activation x int8 weight ------------------------------------------------------
#
# torchao Int8DynamicActivationInt8WeightConfig quantizes x per row in the graph and calls _int_mm:
#     xq = convert_i8(clamp(round(x * (1 / s_x))))                    [+128 -> u8 on VNNI CPUs]
#     y  = convert(_int_mm(view(xq), permute(w_i8)) [- 128 * colsum(w)]) * s_x * s_w
# The whole span, from x to the weight scale, becomes one zen.quant_linear on x.


def search_dynamic(ctx):
    for mm in ctx.graph.find_nodes(op="call_function", target=aten._int_mm.default):
        a, b = mm.args
        if b in ctx.constants and a not in ctx.constants:
            yield mm


def _activation_source(ctx, a: fx.Node) -> fx.Node:
    """The float activation that ``a`` quantizes: the input of the ``round`` in its chain."""
    node = a
    while node.target is not aten.round.default:
        moving = [i for i in node.all_input_nodes if i not in ctx.constants]
        if len(moving) != 1 or node.op != "call_function":
            raise PatternMiss("the int8 activation of _int_mm is not a per-row quantization of one tensor")
        node = moving[0]
    scaled = node.args[0]
    numel = fake_value(a).numel()
    for operand in scaled.all_input_nodes if scaled.target in (aten.mul.Tensor, aten.div.Tensor) else ():
        if fake_value(operand).numel() == numel and fake_value(operand).dtype.is_floating_point:
            return operand
    raise PatternMiss("could not find the float activation before round()")


def _output_span(ctx, mm: fx.Node, n: int):
    """Follow _int_mm's result to the multiply by the per-column weight scale."""
    node = mm
    while len(node.users) == 1:
        (user,) = node.users
        others = [a for a in user.args if a is not node]
        if user.target in CONVERTS or (user.target is aten.sub.Tensor and others[0] in ctx.constants):
            node = user  # dtype change, or the u8 zero-point compensation
            continue
        if user.target is aten.mul.Tensor and isinstance(others[0], fx.Node):
            scale = others[0]
            if scale in ctx.constants and fake_value(scale).numel() == n:
                return user, scale
            if scale not in ctx.constants:  # the activation's per-row scale
                node = user
                continue
        break
    raise PatternMiss("no per-column weight scale after _int_mm")


def rewrite_dynamic(ctx, mm) -> None:
    a, b = mm.args
    x = _activation_source(ctx, a)
    act = fake_value(x)
    if act.dtype not in _ACT_DTYPES:
        raise PatternMiss(f"{act.dtype} activations: kernels are verified for bf16 and fp32 only")
    if not ctx.frozen:
        raise PatternMiss("the weight is a graph input, not a constant: compile under torch.no_grad() with freezing on")
    k, n = fake_value(b).shape
    out, scale_node = _output_span(ctx, mm, n)

    def read():
        w_scale = ctx.evaluate(scale_node).to(torch.float32).reshape(n, 1)
        q = ctx.evaluate(b).t()
        return describe_quantized(q, w_scale.expand(n, k), torch.zeros(n, 1).expand(n, k), k)

    weight = ctx.weight([b, scale_node], ("read_da8",), read)
    spec = LinearSpec(n=n, k=k, group_size=k, bits=weight.bits, symmetric=weight.symmetric,
                      act_dtype=act.dtype, dynamic_activation=True)
    with ctx.graph.inserting_before(out):
        rows = ctx.graph.call_function(aten.reshape.default, (x, [-1, k]))
        rows.meta["val"] = act.reshape(-1, k)
    _replace(ctx, mm, out, rows, None, weight, spec, f"da8w{spec.bits}_per_channel", [b, scale_node])


# --- ATen's packed int4 op -----------------------------------------------------------------------
#
# torchao PrototypeInt4WeightOnlyConfig (and gpt-fast style code) already calls one fused op:
#     y = _weight_int4pack_mm_for_cpu(x, packed_u8[N, K/2], G, scale_and_zero[K/G, N, 2])
# It is one candidate among several: taking it over lets prefill rows go to a faster kernel.


def search_int4pack(ctx):
    for mm in ctx.graph.find_nodes(op="call_function", target=aten._weight_int4pack_mm_for_cpu.default):
        x, packed, group, scale_and_zero = mm.args
        if packed in ctx.constants and scale_and_zero in ctx.constants and x not in ctx.constants:
            yield mm


def rewrite_int4pack(ctx, mm) -> None:
    x, packed_node, group, sz_node = mm.args
    act = fake_value(x)
    if act.dtype not in _ACT_DTYPES:
        raise PatternMiss(f"{act.dtype} activations: kernels are verified for bf16 and fp32 only")
    weight = ctx.weight([packed_node, sz_node], ("read_int4pack",), lambda: _read_int4pack(ctx, packed_node, group, sz_node))
    spec = LinearSpec(n=weight.n, k=weight.k, group_size=weight.group_size, bits=weight.bits, symmetric=weight.symmetric, act_dtype=act.dtype)
    _replace(ctx, mm, mm, x, None, weight, spec, "int4pack_" + variant_name(spec), [packed_node, sz_node])


def _read_int4pack(ctx, packed_node, group, sz_node) -> QuantWeight:
    packed, sz = ctx.evaluate(packed_node), ctx.evaluate(sz_node)
    k, n = group * sz.shape[0], sz.shape[1]
    # the op itself unpacks: on the identity with unit scales and zero offsets it returns the codes
    eye = torch.eye(k, dtype=sz.dtype)
    unit = torch.stack([torch.ones(k // group, n), torch.zeros(k // group, n)], dim=-1).to(sz.dtype)
    q = aten._weight_int4pack_mm_for_cpu(eye, packed, group, unit).t().to(torch.float32)
    scale = sz[..., 0].t().to(torch.float32).repeat_interleave(group, dim=1)
    offset = sz[..., 1].t().to(torch.float32).repeat_interleave(group, dim=1)
    real = aten._weight_int4pack_mm_for_cpu(eye, packed, group, sz).t().to(torch.float32)
    if sqnr_db(q * scale + offset, real) < 40:
        raise PatternMiss("could not read the packed int4 weight")
    return describe_quantized(q, scale, offset, group)


FAMILY = Family(PATTERN, "dequant_matmul", apply)
