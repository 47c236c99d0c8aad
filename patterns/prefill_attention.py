"""prefill_attention: attention over a prompt given only the keys its queries may see, and by
zentorch's SDPA kernel where that is ahead of ATen's.

Matches (joint graph)::

    out = _scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal, attn_mask=m, scale=s)[0]
        q: [B, H, L, D]   k, v: [B, Hkv, S, D]   (L not statically 1; L and S may be dynamic)

Why: ATen's CPU flash attention is slow on causal prompts of LLM sizes; ``zentorch_sdpa`` takes
the same arguments, returns the same outputs and computes the same function (GQA, masks, top-left
causal mask when L != S; SQNR against an fp64 reference equal to ATen's to 0.1 dB) about twice as
fast. Measured here (Zen 4, 2 threads, bf16, 32 query over 8 KV heads, D=64, causal, us a call):
L=16 65 -> 48, L=128 2739 -> 1269, L=1024 50282 -> 25588; fp32 at L=128 1325 -> 1045. That is
~6 ms of a 128-token prefill of the 4-layer 1B benchmark model.

Constraints: zentorch usable on this CPU (``cpu.zentorch_unavailable``); bf16 or fp32 (its
fp16 kernel is slower than ATen's: 3337 against 2940 us at L=128); no dropout; only the attention
output is used (the log-sum-exp output is not guaranteed to agree). One query position is left to
``decode_attention`` (ATen takes 14 us there, zentorch 27).

Where the CPU has AMX, ATen's flash attention runs bf16 on it: on a Xeon with AMX (2 threads, 9 heads
of 64, causal) ATen took 1.0 / 8.0 / 28.3 ms at 512 / 2048 / 4096 positions against zentorch's 3.4 /
33.1 / 120.0, so bf16 attention stays with ATen there (fp32: 3.5 / 21.0 / 74.7 against 2.7 / 23.5 /
82.9, within 0.77-1.1x: replaced as elsewhere).

Given a mask (and no ``is_causal``), on every CPU and dtype: ``zen.prefill_attention``
(zen_inductor/attention.py) runs the kernel block of queries by block, each over the keys up to
the last one the mask lets a row of the block see. Transformers passes a mask whenever the keys
are not exactly the prompt (a static cache, padding, a cached prefix), and flash attention skips
nothing under a mask: this halves a causal prompt's attention over a static cache (ATen's kernel
at 2048 positions: 69 -> 45 ms, Zen 4, fp32). The kernel is zentorch's where the rules above
allow it, else our flash attention in C++ (on AVX2, where zentorch cannot run: 1.3-1.5x ATen's
blocks, attention.py has the figures), else ATen's flash attention.

Without a mask where zentorch cannot run (AVX2), ``zen.unmasked_attention(q, k, v, scale,
is_causal)``: our C++ flash attention on the KV heads, ahead of ATen's causal kernel (llama1b's
2048-token prompt: 96 against 118-121 ms).

Replacement: without a mask, the call's target becomes ``zentorch.zentorch_sdpa``, arguments
unchanged (or the op above); with one, ``zen.prefill_attention(q, k, v, mask, scale, zentorch)`` takes the place of
the attention output, or ``zen.prefill_attention.by_rows`` (same arguments) where the query length
may be one (one ahead-of-time program for a prompt and every decode step): one position runs
``zen.decode_attention``'s C++ kernel, more go as above.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from zen_inductor import attention
from zen_inductor.cpu import amx_bf16, zentorch_unavailable
from zen_inductor.graph_pass import emit_op

from zen_inductor.graph_facts import call_arg, fake_value, kv_before_repeat_kv, may_be_one

from .decode_attention import why_not_native as why_not_decode
from .family import Family, replace_outputs, rewrite_each

PATTERN = "prefill_attention"
FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_DTYPES = (torch.bfloat16, torch.float32)


# --- search -----------------------------------------------------------------------------------


def search(ctx):
    """Flash-attention calls whose query may have more than one position (prefill)."""
    for node in ctx.graph.find_nodes(op="call_function", target=FLASH):
        q = fake_value(node.args[0])
        if q is not None and q.dim() == 4 and not (isinstance(q.shape[2], int) and q.shape[2] == 1):
            yield node


# --- constraints --------------------------------------------------------------------------------


def why_not(node: fx.Node) -> str | None:
    if call_arg(node, 3, "dropout_p", 0.0):
        return "dropout"
    if any(u.target is not operator.getitem or u.args[1] != 0 for u in node.users):
        return "the log-sum-exp output is used too"
    if _masked(node):
        return None  # some kernel always runs it, the blocks trimmed
    why_not = why_not_zentorch(node)
    if why_not is None or node.kwargs.get("attn_mask") is None and _why_not_native(node) is None:
        return None  # zentorch's kernel, else ours (without a mask)
    return why_not


def _why_not_native(node: fx.Node) -> str | None:
    q = fake_value(node.args[0])
    return attention.native_prefill_unavailable(q.dtype, q.shape[-1])


def why_not_zentorch(node: fx.Node) -> str | None:
    """Why zentorch's SDPA must not run this attention (ATen's flash attention does), or None."""
    unavailable = zentorch_unavailable()
    if unavailable:
        return unavailable
    q = fake_value(node.args[0])
    if q.dtype not in _DTYPES:
        return f"{q.dtype} attention (zentorch's kernel is measured faster for bf16 and fp32 only)"
    if q.dtype == torch.bfloat16 and amx_bf16():
        return AMX_REASON
    return None


def _masked(node: fx.Node) -> bool:
    """A floating additive mask and no is_causal (with is_causal flash attention skips the blocks itself)."""
    mask = node.kwargs.get("attn_mask")
    value = fake_value(mask)
    return (value is not None and value.is_floating_point() and value.dim() >= 2
            and not call_arg(node, 4, "is_causal", False))


AMX_REASON = "bf16 on a CPU with AMX, where ATen's flash attention runs 3.4-4.2x faster than zentorch's"


# --- rewrite ------------------------------------------------------------------------------------


def rewrite(ctx, node: fx.Node) -> None:
    if _masked(node):
        _rewrite_masked(ctx, node)
        return
    if why_not_zentorch(node) is not None:
        _rewrite_unmasked(ctx, node)
        return
    with ctx.graph.inserting_before(node):
        sdpa = ctx.graph.call_function(torch.ops.zentorch.zentorch_sdpa.default, node.args, node.kwargs)
    sdpa.meta.update(node.meta)  # same outputs, and the one that is used has the same value
    node.replace_all_uses_with(sdpa)
    ctx.graph.erase_node(node)
    ctx.record.match(PATTERN, _variant(*sdpa.args[:2]), sdpa, "zentorch_sdpa")


def _operands(node: fx.Node) -> tuple:
    """``(q, k, v, scale)`` of a flash-attention call, K and V as the cache holds them: transformers
    repeats them over the query heads (``repeat_kv``) and our kernels take the KV heads (GQA)."""
    q = node.args[0]
    k, v = kv_before_repeat_kv(*node.args[1:3], fake_value(q).shape[1])
    scale = call_arg(node, 5, "scale", None)
    return q, k, v, float(scale if scale is not None else fake_value(q).shape[-1] ** -0.5)


def _rewrite_unmasked(ctx, node: fx.Node) -> None:
    """No mask and no zentorch (AVX2): our C++ kernel, causal or over every key, on the KV heads."""
    q, k, v, scale = _operands(node)
    causal = bool(call_arg(node, 4, "is_causal", False))
    with ctx.graph.inserting_before(node):
        out = emit_op(ctx.graph, attention.unmasked_attention, q, k, v, scale, causal)
    ctx.record.match(PATTERN, _variant(q, k) + ("_causal" if causal else ""), node,
                     f"zen.unmasked_attention: zen's flash attention in C++ ({why_not_zentorch(node)})")
    replace_outputs(ctx.graph, node, out)


def _variant(q: fx.Node, k: fx.Node) -> str:
    return "gqa" if fake_value(k) is not None and fake_value(k).shape[1] != fake_value(q).shape[1] else "mha"


def _where_constants(node) -> tuple | None:
    """``(mask, a, b, dtype)`` where ``node`` is ``where(mask, full(a), full(b))``, else None."""
    if not (isinstance(node, fx.Node) and node.target is torch.ops.aten.where.self):
        return None
    values = []
    for arg in node.args[1:]:
        if not (isinstance(arg, fx.Node) and arg.target is torch.ops.aten.full.default and arg.args[0] == []):
            return None
        values.append((arg.args[1], arg.kwargs.get("dtype")))
    return (node.args[0], *values)


def _shared_mask(graph: fx.Graph, mask: fx.Node) -> fx.Node:
    """The graph's first conversion of the same boolean mask to the same additive one as ``mask``.

    SDPA turns a boolean mask into an additive one (``where(mask, 0, -inf)``) at every call, and
    every layer calls it with the model's one mask: at 4096 x 4160 positions 30 fp32 masks of 68 MB
    were written a prompt, ~1.5 s of SmolLM2's 13 s prefill. Each layer now reads the first."""
    key = _where_constants(mask)
    if key is None:
        return mask
    same = {u for u in key[0].users if _where_constants(u) == key}
    return next(n for n in graph.nodes if n in same)


def _rewrite_masked(ctx, node: fx.Node) -> None:
    q, k, v, scale = _operands(node)
    why_not_ours = why_not_zentorch(node)
    # a program whose query length may be one (ahead of time: a prompt, then every decode step)
    # runs one position by decode attention, in C++
    by_rows = may_be_one(fake_value(q).shape[2], ctx.ahead_of_time) and why_not_decode(node, fake_value(k).shape[1]) is None
    with ctx.graph.inserting_before(node):
        out = emit_op(ctx.graph, attention.attention_by_rows if by_rows else attention.prefill_attention, q, k, v,
                      _shared_mask(ctx.graph, node.kwargs["attn_mask"]), scale, why_not_ours is None)
    kernel = "zentorch_sdpa" if why_not_ours is None else _kernel_without_zentorch(node, why_not_ours)
    one = "; one position by zen.decode_attention (C++)" if by_rows else ""
    ctx.record.match(PATTERN, _variant(q, k) + "_masked", node, f"zen.prefill_attention, blocks by {kernel}{one}")
    replace_outputs(ctx.graph, node, out)


def _kernel_without_zentorch(node: fx.Node, why_not_zentorch: str) -> str:
    why_not_native = _why_not_native(node)
    if why_not_native is None:
        return f"zen's flash attention in C++ ({why_not_zentorch})"
    return f"ATen's flash attention ({why_not_zentorch}; {why_not_native})"


apply = rewrite_each(PATTERN, search, why_not, rewrite, "prefill attention left to ATen's flash attention")

FAMILY = Family(PATTERN, "prefill_attention", apply)
