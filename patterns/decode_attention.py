"""decode_attention: attention of one new token over the KV cache, in our C++ or as two small GEMMs.

Matches (joint graph)::

    out = _scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=s)[0]
        q: [B, H, 1, D]   k, v: [B, Hkv, L, D]   (L may be dynamic; H a multiple of Hkv: GQA)

Why: at decode the query has one position, and ATen's CPU flash-attention kernel, blocked for long
queries, spends ~2 us per cached position on it: 350 us a layer at L=160 on this machine, where
``softmax(q k^T s) v`` as two batched GEMMs and one fused softmax costs about a third of that
(measured eager: 91-127 us). That was 12-15% of a decode step of the 4-layer benchmark models.

Constraints: one query position (prefill stays with flash attention); no dropout, not causal
(with one query position attention over every cached key the mask allows is exactly what is
asked); B, H, Hkv and D static; only the attention output is used.

The mask: transformers passes one with every StaticCache (the positions not yet written are
masked), and a boolean mask reaches this op as an additive float one (``where(m, 0, -inf)``).
It is added to the scores in fp32. A row whose every position is masked gives 0, as flash
attention does (its max is clamped to a finite value and the softmax's sum kept above 0, so
0 / tiny = 0),
where a plain softmax would give NaN.

Replacement: ``zen.decode_attention`` (zen_inductor/attention.py, C++), where it builds: K and V
read once per KV head for its group of query heads, only up to the last position the mask lets a
query see, fp32 throughout. Otherwise (or with ``config.native_decode_attention`` off): per KV head,
the group of H/Hkv query heads as one [G, D] x [D, L] GEMM in fp32 (flash attention accumulates in
fp32 too), the mask added, a max-subtracted softmax over L, one [G, L] x [L, D] GEMM, rounded
once to the query's dtype.

Either reads the cache itself when the K and V given are transformers' ``repeat_kv`` copies of it
(``graph_facts.before_repeat_kv``). Where that cache is int8 codes dequantized with one scale a KV head and
position (``zen_inductor.kv_cache.Int8StaticCache``: ``(codes.to(fp32) * scales).to(dtype)``), the C++
kernel takes the codes and scales themselves (``_int8_codes``) and reads 1 byte a value, not the
dequantized copy of the whole cache the graph would otherwise write and read at every step; a bf16
cache widened for an fp32 model (``Bf16StaticCache``: ``keys.to(fp32)``) is read as bf16 the same
way (``_bf16_cache``). In a SmolLM2 decode step at a 512-token prompt the C++ kernel took the
step from 10.0-10.5 to 8.4 ms against the GEMMs; at 128 tokens they tie
(benchmarks/results/decode-step-smollm2.md).
"""
from __future__ import annotations

import functools
import math
import operator

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from zen_inductor import attention, config
from zen_inductor.graph_pass import emit_op

from zen_inductor.graph_facts import call_arg, fake_value, kv_before_repeat_kv, under_full_slices

from .family import Family, replace_outputs, rewrite_each

aten = torch.ops.aten
prims = torch.ops.prims

PATTERN = "decode_attention"
FLASH = aten._scaled_dot_product_flash_attention_for_cpu.default


# --- search -----------------------------------------------------------------------------------


def search(ctx):
    """Flash-attention calls whose query has a single position (decode)."""
    for node in ctx.graph.find_nodes(op="call_function", target=FLASH):
        q = fake_value(node.args[0])
        if q is not None and q.dim() == 4 and isinstance(q.shape[2], int) and q.shape[2] == 1:
            yield node


# --- constraints --------------------------------------------------------------------------------


def why_not(node: fx.Node) -> str | None:
    q, k, v = (fake_value(a) for a in node.args[:3])
    if k is None or v is None or k.dim() != 4 or v.dim() != 4:
        return "key or value is not a 4-D tensor"
    if call_arg(node, 3, "dropout_p", 0.0):
        return "dropout"
    if call_arg(node, 4, "is_causal", False):
        return "is_causal with one query position attends to the first key only (top-left causal mask)"
    b, h, _, d = q.shape
    hkv = k.shape[1]
    if not all(isinstance(s, int) for s in (b, h, d, hkv, v.shape[1], k.shape[3], v.shape[3])):
        return "batch, heads or head size are dynamic"
    if h % hkv or v.shape[1] != hkv or k.shape[3] != d or v.shape[3] != d:
        return f"{h} query heads over {hkv} key/value heads of sizes {k.shape[3]}/{v.shape[3]}"
    if any(u.target is not operator.getitem or u.args[1] != 0 for u in node.users):
        return "the log-sum-exp output is used too"
    return None


# --- rewrite ------------------------------------------------------------------------------------

_CONVERTS = (prims.convert_element_type.default, aten._to_copy.default)


def _int8_codes(node: fx.Node):
    """``(codes, scales)`` where ``node`` is ``(codes.to(fp32) * scales).to(dtype)`` with int8 codes
    [B, Hkv, L, D] and fp32 scales [B, Hkv, L, 1] (one a KV head and position), else None."""
    if isinstance(node, fx.Node) and node.target in _CONVERTS:
        node = node.args[0]
    if not (isinstance(node, fx.Node) and node.target is aten.mul.Tensor and len(node.args) == 2):
        return None
    for widened, scales in (node.args, node.args[::-1]):
        if not (isinstance(widened, fx.Node) and widened.target in _CONVERTS and isinstance(scales, fx.Node)):
            continue
        codes = widened.args[0]
        c, sc, w = fake_value(codes), fake_value(scales), fake_value(widened)
        if c is None or sc is None or c.dtype != torch.int8 or w.dtype != torch.float32 or sc.dtype != torch.float32:
            continue
        if c.dim() == 4 and sc.dim() == 4 and statically_known_true(sc.shape[3] == 1) and all(
                statically_known_true(sc.shape[i] == c.shape[i]) for i in range(3)):
            return codes, scales
    return None


def _bf16_cache(node: fx.Node):
    """The bf16 cache where ``node`` is it widened to fp32 (``zen_inductor.kv_cache.Bf16StaticCache``
    beside an fp32 model: ``keys.to(fp32)``), else None."""
    if not (isinstance(node, fx.Node) and node.target in _CONVERTS and isinstance(node.args[0], fx.Node)):
        return None
    narrow, wide = fake_value(node.args[0]), fake_value(node)
    if narrow is None or wide is None or narrow.dtype != torch.bfloat16 or wide.dtype != torch.float32 or narrow.dim() != 4:
        return None
    return node.args[0]


def why_not_native(node: fx.Node, hkv: int) -> str | None:
    """Why zen.decode_attention cannot take this call over ``hkv`` KV heads (the GEMMs do), or None."""
    q, k, v = (fake_value(a) for a in node.args[:3])
    mask = node.kwargs.get("attn_mask")
    if k.dtype != v.dtype or k.dtype not in (torch.float32, torch.bfloat16):
        return f"{k.dtype} keys, {v.dtype} values"
    if mask is not None and not fake_value(mask).is_floating_point():
        return f"a {fake_value(mask).dtype} mask"
    if q.shape[3] > 512 or q.shape[1] // hkv > 64:
        return "head size over 512 or more than 64 query heads a KV head"
    if not config.native_decode_attention:
        return "config.native_decode_attention is off"
    return attention.unavailable()


def rewrite(ctx, node: fx.Node) -> None:
    q = node.args[0]
    b, h, _, d = fake_value(q).shape
    k, v = kv_before_repeat_kv(*node.args[1:3], h)
    hkv = fake_value(k).shape[1]
    scale = call_arg(node, 5, "scale", None)
    scale = scale if scale is not None else 1 / math.sqrt(d)
    mask = node.kwargs.get("attn_mask")
    variant = ("gqa" if h != hkv else "mha") + ("_masked" if mask is not None else "")
    if why_not_native(node, hkv) is None:
        k_cache, v_cache = under_full_slices(k), under_full_slices(v)
        k_int8, v_int8 = _int8_codes(k_cache), _int8_codes(v_cache)
        k_bf16, v_bf16 = _bf16_cache(k_cache), _bf16_cache(v_cache)
        if k_int8 is not None and v_int8 is not None:
            args, cache = (k_int8[0], v_int8[0], mask, float(scale), k_int8[1], v_int8[1]), "_int8"
        elif k_bf16 is not None and v_bf16 is not None:
            args, cache = (k_bf16, v_bf16, mask, float(scale)), "_bf16"
        else:
            args, cache = (k, v, mask, float(scale)), ""
        with ctx.graph.inserting_before(node):
            out = emit_op(ctx.graph, attention.decode_attention, q, *args)
        ctx.record.match(PATTERN, variant + cache, node, "zen.decode_attention (C++)")
        replace_outputs(ctx.graph, node, out)
        return
    op = functools.partial(emit_op, ctx.graph)
    with ctx.graph.inserting_before(node):
        f32 = prims.convert_element_type.default
        qg = op(aten.reshape.default, op(f32, q, torch.float32), [b * hkv, h // hkv, d])
        kt = op(aten.permute.default, op(aten.reshape.default, op(f32, k, torch.float32), [b * hkv, -1, d]), [0, 2, 1])
        vv = op(aten.reshape.default, op(f32, v, torch.float32), [b * hkv, -1, d])
        scores = op(aten.mul.Tensor, op(aten.bmm.default, qg, kt), scale)
        if mask is not None:  # broadcast to [B, H, 1, L] (or 1 for L), then grouped as the scores
            mask = op(aten.expand.default, op(f32, mask, torch.float32), [b, h, 1, -1])
            scores = op(aten.add.Tensor, scores, op(aten.reshape.default, mask, [b * hkv, h // hkv, -1]))
        row_max = op(aten.amax.default, scores, [-1], True)
        if mask is not None:  # a fully masked row: -inf - -inf would be NaN; a finite max is kept
            row_max = op(aten.clamp_min.default, row_max, torch.finfo(torch.float32).min)
        e = op(aten.exp.default, op(aten.sub.Tensor, scores, row_max))
        total = op(aten.sum.dim_IntList, e, [-1], True)
        if mask is not None:
            total = op(aten.clamp_min.default, total, torch.finfo(torch.float32).tiny)
        probs = op(aten.div.Tensor, e, total)
        out = op(aten.reshape.default, op(aten.bmm.default, probs, vv), [b, h, 1, d])
        out = op(f32, out, fake_value(q).dtype)
    ctx.record.match(PATTERN, variant, node, f"bmm + softmax + bmm (fp32): {why_not_native(node, hkv)}")
    replace_outputs(ctx.graph, node, out)


apply = rewrite_each(PATTERN, search, why_not, rewrite, "decode attention left to flash attention")

FAMILY = Family(PATTERN, "decode_attention", apply)
