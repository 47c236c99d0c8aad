"""Reading a quantized weight from the graph that dequantizes it: the engine behind dequant_matmul.

The chain from integer codes to the float weight is not matched op by op. It is evaluated on the
real weights with the float codes set to 0 and to 1, which gives the offset and the scale of every
weight element whatever the spelling (torchao's tensors, GPTQ's shifts and masks, a GGUF file's
nibbles, hand-written code), and the group size is where scale and offset stay constant along K.
Two probes suffice because the chain is proven affine in the codes by its ops (``check_chain``):
layout ops, and sums and products in which a code is never a divisor (a cast of codes to integers
after float ops would make a second int->float convert, which ``find_codes`` refuses).
The result is a ``QuantWeight``.
Constraints that fail raise ``PatternMiss`` with the reason.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.fx as fx

from .gguf_model import dequantize_blocks, element_codes, split_blocks
from .graph_facts import CONVERTS, fake_value
from .kernels import QuantWeight, fp32_row_blocks
from .record import PatternMiss

aten = torch.ops.aten
prims = torch.ops.prims
# a GGUF file's blocks dequantized by one op (gguf_model.dequantize_as_one_op): the op stands
# where a chain's codes would, and the blocks say codes, scales and minima outright
GGUF_DEQUANTIZE = torch.ops.zen.gguf_dequantize.default

LAYOUT_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default,
    aten.t.default, aten.transpose.int, aten.clone.default, aten.alias.default,
    aten.squeeze.dim, aten.unsqueeze.default, aten.expand.default,
    prims.convert_element_type.default, aten._to_copy.default,
}
AFFINE_OPS = {aten.sub.Tensor, aten.add.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.neg.default, aten.rsub.Scalar}
_MIN_GROUP = 8


def is_int_to_float(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in CONVERTS:
        return False
    src, out = fake_value(node.args[0]) if node.args else None, fake_value(node)
    return src is not None and out is not None and not src.dtype.is_floating_point and src.dtype != torch.bool and out.dtype.is_floating_point


def find_codes(weight: fx.Node) -> fx.Node | None:
    """The integer node holding the raw codes: one value per weight element.

    Found as the int->float convert of the chain, moved up past integer zero-point arithmetic
    (GPTQ code subtracts int zeros before converting: ``convert(q - zeros)``); or the
    ``zen::gguf_dequantize`` node itself.
    """
    convert = _find_convert(weight)
    if convert is None or convert.target is GGUF_DEQUANTIZE:
        return convert
    codes, numel = convert.args[0], fake_value(weight).numel()
    while (
        isinstance(codes, fx.Node)
        and codes.target in (aten.sub.Tensor, aten.add.Tensor)
        and isinstance(codes.args[0], fx.Node)
        and fake_value(codes.args[0]) is not None
        and fake_value(codes.args[0]).numel() == numel
        and not (isinstance(codes.args[1], fx.Node) and fake_value(codes.args[1]).numel() == numel)
    ):
        codes = codes.args[0]
    return codes


def _find_convert(weight: fx.Node) -> fx.Node | None:
    """The int->float convert that produces one value per weight element."""
    numel = fake_value(weight).numel()
    found, stack, seen = [], [weight], set()
    while stack:
        node = stack.pop()
        if node in seen or not isinstance(node, fx.Node):
            continue
        seen.add(node)
        if (is_int_to_float(node) or node.target is GGUF_DEQUANTIZE) and fake_value(node).numel() == numel:
            found.append(node)
            continue
        stack.extend(node.all_input_nodes)
    return found[0] if len(found) == 1 else None


def _path(codes: fx.Node, weight: fx.Node) -> list[fx.Node]:
    """Nodes from ``codes`` (exclusive) to ``weight`` (inclusive), in graph order."""
    below, stack = set(), [weight]
    while stack:
        node = stack.pop()
        if node in below or node is codes:
            continue
        below.add(node)
        stack.extend(node.all_input_nodes)
    above, stack = set(), [codes]
    while stack:
        node = stack.pop()
        for user in node.users:
            if user not in above and user in below:
                above.add(user)
                stack.append(user)
    order = {n: i for i, n in enumerate(weight.graph.nodes)}
    return sorted(above, key=order.__getitem__)


def _along_path(ctx, codes: fx.Node, path: list[fx.Node], value: torch.Tensor, affine: bool) -> torch.Tensor:
    """``value`` in the codes' place, moved along the chain to the weight.

    ``affine=False``: layout ops only (affine ops and conversions pass the value through), so
    integer codes keep their one byte per element. ``affine=True``: an fp32 probe goes through
    the affine ops too, in fp32, where products of small codes and bf16 scales are exact, so the
    chain's scale and offset can be read off (f(1) - f(0) and f(0)). The path's other inputs
    (scales, zero points) are what the model computes, widened to fp32.

    Elementwise ops update the probe in place when their result has its shape: each new
    full-size fp32 tensor of a big weight costs ~0.5 s a GB in page faults on this VM, and the
    ops themselves ~0.1 s (an 8192 x 32000 weight read in 2.7 s instead of 9.7).
    """
    values = {codes: value}
    for node in path:
        (src,) = [a for a in node.all_input_nodes if a in values]  # check_chain: exactly one
        v = values[src]
        if node.target in CONVERTS or (node.target in AFFINE_OPS and not affine):
            values[node] = v
            continue
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: v if n is src else _fp32(ctx.evaluate(n)))
        updated = _in_place(node.target, v, args, kwargs) if affine else None
        values[node] = updated if updated is not None else node.target(*args, **kwargs)
    return values[path[-1]] if path else value


_IN_PLACE = {aten.sub.Tensor: "sub_", aten.add.Tensor: "add_", aten.mul.Tensor: "mul_", aten.div.Tensor: "div_"}
_COMMUTATIVE = (aten.add.Tensor, aten.mul.Tensor)


def _in_place(target, v: torch.Tensor, args, kwargs) -> torch.Tensor | None:
    """``target(*args)`` as an in-place update of ``v``, or None where that would not be the same."""
    if target not in _IN_PLACE or len(args) != 2 or kwargs or v.dtype != torch.float32:
        return None
    if args[0] is v:
        other = args[1]
    elif args[1] is v and target in _COMMUTATIVE:
        other = args[0]
    else:
        return None
    shape = other.shape if isinstance(other, torch.Tensor) else ()
    # v must own every element it shows (no expand) and keep its shape under broadcasting
    if torch.broadcast_shapes(v.shape, shape) != v.shape or v.numel() * 4 != v.untyped_storage().nbytes():
        return None
    return getattr(v, _IN_PLACE[target])(other)


def _fp32(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64:
        return value.to(torch.float32)
    return value


def check_chain(ctx, weight: fx.Node) -> None:
    """What can be told of the dequant chain without running it (raises ``PatternMiss``).

    Checked on every graph, also when an earlier graph of the model already read this weight.
    """
    codes = find_codes(weight)
    if any(n not in ctx.constants for n in (weight, codes)):
        raise PatternMiss("the weight is a graph input, not a constant: compile under torch.no_grad() with freezing on")
    path = _path(codes, weight)
    for node in path:
        if node.target not in LAYOUT_OPS and node.target not in AFFINE_OPS:
            raise PatternMiss(f"{node.target} between the integer codes and the matmul is not a dequant op")
        if sum(a in path or a is codes for a in node.all_input_nodes) != 1:
            raise PatternMiss("the dequant chain combines the codes with themselves")
        divisor = node.args[1] if node.target is aten.div.Tensor and len(node.args) > 1 else None
        if isinstance(divisor, fx.Node) and (divisor in path or divisor is codes):
            raise PatternMiss("the dequant chain is not affine in the integer codes: a code is a divisor")


def read_weight(ctx, weight: fx.Node, post_scale: fx.Node | None) -> QuantWeight:
    """Scale, offset and codes of a chain that passed ``check_chain``.

    May run after later families (a linear merged by concat is read when the merged weight is
    packed): ``PatternContext.weight`` keeps the chain's nodes in the graph until then. A chain
    that torch cannot evaluate on the probes is a miss with torch's reason: the linear stays
    Inductor's, which computes it as the model does.
    """
    try:
        return _read_weight(ctx, weight, post_scale)
    except RuntimeError as e:
        raise PatternMiss(f"the dequant chain could not be evaluated on probe codes: {e}") from e


def _read_weight(ctx, weight: fx.Node, post_scale: fx.Node | None) -> QuantWeight:
    codes = find_codes(weight)
    path = _path(codes, weight)
    read = _read_blocks(ctx, codes, path) if codes.target is GGUF_DEQUANTIZE else _read_chain(ctx, codes, path)
    if post_scale is None:
        return read
    # Int8WeightOnly: y = mm(x, convert(codes^T)) * scale[N], exact in fp32 here
    column = ctx.evaluate(post_scale).to(torch.float32).reshape(-1, 1)
    return dataclasses.replace(read, scale=read.scale * column, offset=read.offset * column)


def _read_chain(ctx, codes: fx.Node, path: list[fx.Node]) -> QuantWeight:
    raw = ctx.evaluate(codes)
    if not _dense(raw).is_contiguous():  # codes that are a slice of wider records (a GGUF
        raw = raw.contiguous()  # block's bytes): the probes must be dense, as the chain's results are
    bits, shift = code_range(*torch.aminmax(_dense(raw)))
    # signed one-byte codes; the shift moves into the offset: q * s + b == (q - shift) * s + (b + shift * s)
    signed = (raw.to(torch.int16) - shift).to(torch.int8) if shift else raw.to(torch.int8)
    q = _along_path(ctx, codes, path, signed, affine=False)
    # mm sees the weight as [K, N]; the canonical form is [N, K]. The probes take the codes'
    # strides: codes seen transposed (Int8WeightOnly's t() before the convert) then give
    # [N, K]-contiguous results, and the transposes below copy nothing (they were 5 s of a
    # 328 M-parameter read here).
    offset = _along_path(ctx, codes, path, torch.zeros_like(raw, dtype=torch.float32), affine=True).t().contiguous()
    symmetric = not offset.any()
    if symmetric:  # f(1) is then the scale, and the two full-size probes are never held at once
        offset = torch.zeros(offset.shape[0], 1).expand(offset.shape)
    scale = _along_path(ctx, codes, path, torch.ones_like(raw, dtype=torch.float32), affine=True).t().contiguous()
    q = q.t().contiguous()
    if not symmetric:
        scale -= offset
    if shift:  # the codes' shift moves into the offset (above)
        offset = scale * shift if symmetric else offset.add_(scale, alpha=shift)
    # no third evaluation on the real codes: check_chain proved the chain affine, and that proof
    # in fp32 was a third of the reading (6-9 s of a cold 1B int4 compile)
    return describe_quantized(q, scale, offset, group_hint(codes, q.shape[1]))


def _read_blocks(ctx, op: fx.Node, path: list[fx.Node]) -> QuantWeight:
    """The QuantWeight of a ``zen::gguf_dequantize`` node: its blocks' codes, shifted to signed
    (Q4: q - 8, the 8 moving into the offset), their scales d and Q4_1's minima m; proven
    against the op's own result moved along the path (transposes, the cast to x's dtype)."""
    blocks, kind = ctx.evaluate(op.args[0]), op.args[1]
    qs, d, m = split_blocks(kind, blocks)
    n = d.shape[0]
    scale = d.to(torch.float32).contiguous()
    codes = element_codes(kind, qs).reshape(n, -1)
    if kind == "Q8_0":
        codes, bits, offset = codes.contiguous(), 8, torch.zeros_like(scale)
    else:
        codes, bits = codes.view(torch.int8) - 8, 4
        offset = m.to(torch.float32) + 8 * scale if kind == "Q4_1" else torch.zeros_like(scale)
    weight = QuantWeight(codes=codes, scale=scale, offset=offset, zero_point=integer_zero_point(scale, offset),
                         group_size=codes.shape[1] // scale.shape[1], bits=bits)
    _prove_blocks(weight, _along_path(ctx, op, path, dequantize_blocks(kind, blocks), affine=True).t())
    return weight


def _prove_blocks(weight: QuantWeight, real: torch.Tensor) -> None:
    """The op's result moved along its path gives the weight as read from the blocks (to 45 dB,
    the weight read as signal): a path that scales or moves the weight otherwise fails. Dequantized
    a block of rows at a time in one small buffer: one more full-size fp32 tensor cost ~0.5 s a GB
    of page faults here."""
    signal = noise = 0.0
    for w, start, end in fp32_row_blocks(weight.n, weight.k):
        weight.dequantize_rows(w, start, end)
        signal += float(torch.linalg.vector_norm(w)) ** 2
        noise += float(torch.linalg.vector_norm(w.sub_(real[start:end]))) ** 2
    if not noise <= signal * 10 ** (-45 / 10):  # NaN or inf fail too
        raise PatternMiss("the GGUF weight after its dequantize is not what its blocks say")


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t``'s elements in memory order (a reduction over all of them need not stride)."""
    return t.permute(*sorted(range(t.dim()), key=lambda d: -t.stride(d)))


def group_hint(codes: fx.Node, k: int) -> int:
    shape = tuple(fake_value(codes).shape)
    return shape[-1] if len(shape) == 3 and shape[-2] * shape[-1] == k else k


def _changes_along_k(t: torch.Tensor) -> torch.Tensor:
    """[K - 1] bools: where some row of ``t`` [N, K] differs from the element before it (NaN
    differs from everything)."""
    if t.stride(1) == 0:  # expanded along K: it never changes
        return torch.zeros(t.shape[1] - 1, dtype=torch.bool)
    return (t[:, 1:] != t[:, :-1]).any(0)


def group_size(scale: torch.Tensor, offset: torch.Tensor, hint: int) -> int:
    """The group along K in which scale and offset [N, K] stay constant: ``hint`` where it
    divides the largest such group, else the largest.

    Groups of g hold a constant exactly where every change along K falls on a multiple of g, so the
    largest g is the gcd of K and the changes' positions: one elementwise pass over each tensor.
    (Trying each divisor of K with a min and a max over its groups was 7.5 s of a 1B int4 compile
    here, most of it on the zero offset of symmetric codes, broadcast along K.)"""
    k = scale.shape[1]
    changes = (_changes_along_k(scale) | _changes_along_k(offset)).nonzero().flatten() + 1
    largest = math.gcd(k, *changes.tolist())
    return hint if largest % hint == 0 else largest


def code_range(qmin, qmax) -> tuple[int, int]:
    """(bits, shift) of integer codes in [qmin, qmax]; ``codes - shift`` is signed."""
    qmin, qmax = int(qmin), int(qmax)
    if qmin >= -8 and qmax <= 7:
        return 4, 0
    if qmin >= 0 and qmax <= 15:
        return 4, 8
    if qmin >= -128 and qmax <= 127:
        return 8, 0
    if qmin >= 0 and qmax <= 255:
        return 8, 128
    raise PatternMiss(f"integer codes span [{qmin}, {qmax}], wider than 8 bits")


def describe_quantized(q, scale, offset, hint: int) -> QuantWeight:
    """The QuantWeight of ``w = q * scale + offset`` (all [N, K]; q holds integer values)."""
    n, k = q.shape
    bits, shift = code_range(*torch.aminmax(q))
    if shift:
        q = (q if q.is_floating_point() else q.to(torch.int16)) - shift
        offset = offset + shift * scale
    group = group_size(scale, offset, hint)
    # NaN (a code as a divisor makes it) differs even from itself: every position is a change
    if group == 1 and bool(scale.isnan().any() or offset.isnan().any()):
        raise PatternMiss("the dequant chain is not affine in the integer codes (its probes gave NaN)")
    if group < _MIN_GROUP:
        raise PatternMiss(f"scales change every {group} elements along K; no kernel takes groups that small")
    s = scale.view(n, k // group, group)[..., 0]
    b = offset.view(n, k // group, group)[..., 0]
    codes = q.round().to(torch.int8) if q.is_floating_point() else q.to(torch.int8)
    # s and b are strided views of full [N, K] fp32 tensors: copied, or every reading of the
    # compile holds 8 bytes a weight (1.1 GB of SmolLM2-135M's 211 readings)
    return QuantWeight(
        codes=codes.contiguous(), scale=s.to(torch.float32).contiguous(), offset=b.to(torch.float32).contiguous(),
        zero_point=integer_zero_point(s, b), group_size=group, bits=bits,
    )


def integer_zero_point(s: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """``zp`` with ``b == -zp * s`` for every group (int32), or None where no integer does."""
    nonzero = s != 0
    z = torch.where(nonzero, -b / torch.where(nonzero, s, 1), 0)
    if torch.equal(z, z.round()) and bool((b[~nonzero] == 0).all()):
        return z.round().to(torch.int32)
    return None
