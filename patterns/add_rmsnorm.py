"""add_rmsnorm / rmsnorm: a residual add feeding an RMSNorm, and a standalone RMSNorm.

Matched by what they compute, around the one ``rsqrt`` every form has::

    h   = x | convert(x, f32)                          x = add(residual, branch) for add_rmsnorm
    r   = rsqrt(mean(h*h | pow(h, 2), [-1], keepdim) + eps)
    y   = h * r                                         (either operand order)
    out = y, then in either order: convert(dtype), mul(weight | 1 + weight)   (either operand order)

so Llama/Mistral/Qwen (``weight * y.to(dtype)``), Gemma (``y * (1 + weight.float())`` before the
downcast) and per-head q/k norms on 4-D tensors (Qwen3) are variants of one reading, not copies.
The weight, with any ``1 +`` folded in, is read on the real tensors.

Candidates: Inductor's own generated kernel, which fuses the add (in fp32), the reduction and the
scaling into one loop; and, with ``config.zentorch_add_rmsnorm`` (off: it rounds the sum to bf16
as eager does, and the test models' logits came out further from fp32), ``zentorch_add_rms_norm_``
(AVX-512 only; in place and 2-D only, so wrapped functionally on a 2-D view). Where zentorch is
off, unavailable or fails verification the subgraph stays with Inductor; the match, the reason and
the choice are in the dumps either way. In decoders ``residual_add`` has taken the adds after
the linears already, so the norms met here are mostly standalone ones reading the fp32 stream.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from zen_inductor import config
from zen_inductor.verification import sqnr_db
from zen_inductor.cpu import zentorch_unavailable
from zen_inductor.record import PatternMiss

from zen_inductor.graph_facts import CONVERTS, fake_value

from .family import Family

aten = torch.ops.aten

PATTERN, STANDALONE = "add_rmsnorm", "rmsnorm"


@dataclass
class Norm:
    x: fx.Node  # what is normalized, in the model's dtype
    residual_add: Optional[fx.Node]  # x itself when x = a + b
    out: fx.Node
    weight: Optional[torch.Tensor]  # effective weight (1 + w for Gemma), or None
    eps: float
    variant: str


def _other(node: fx.Node, this) -> object:
    a, b = node.args[:2]
    return b if a is this else a


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


def read(ctx, rsqrt: fx.Node) -> Norm:
    """Read the RMSNorm around ``rsqrt`` or raise PatternMiss with the reason."""
    plus_eps = rsqrt.args[0]
    if plus_eps.target is not aten.add.Tensor:
        raise PatternMiss("rsqrt of something other than mean + eps")
    mean, eps = (plus_eps.args if isinstance(plus_eps.args[0], fx.Node) else plus_eps.args[::-1])
    if not isinstance(eps, (int, float)) or mean.target is not aten.mean.dim:
        raise PatternMiss("rsqrt of something other than mean + eps")
    square, dims = mean.args[0], mean.args[1]
    keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    ndim = fake_value(square).dim()
    if list(dims) not in ([-1], [ndim - 1]) or not keepdim:
        raise PatternMiss(f"mean over dims {list(dims)} (keepdim={keepdim}); an RMSNorm reduces the last dim")
    if square.target is aten.pow.Tensor_Scalar and square.args[1] == 2:
        h = square.args[0]
    elif square.target is aten.mul.Tensor and square.args[0] is square.args[1]:
        h = square.args[0]
    else:
        raise PatternMiss("mean of something other than a square")
    upcast = h.target in CONVERTS
    x = h.args[0] if upcast else h
    normed = next((u for u in rsqrt.users if u.target is aten.mul.Tensor and _other(u, rsqrt) is h), None)
    if normed is None:
        raise PatternMiss("rsqrt is not multiplied back into its input")

    out, weight, steps = normed, None, []
    for _ in range(2):  # convert and weight multiply, in either order, each at most once
        user = _only_user(out)
        if user is None:
            break
        if user.target in CONVERTS and "convert" not in steps:
            steps.append("convert")
        elif user.target is aten.mul.Tensor and "weight" not in steps:
            w = _other(user, out)
            if not (isinstance(w, fx.Node) and w in ctx.constants and fake_value(w).dim() == 1 and fake_value(w).shape[0] == fake_value(x).shape[-1]):
                break
            weight = ctx.evaluate(w)
            steps.append("weight")
        else:
            break
        out = user
    add = x if x.target is aten.add.Tensor and all(isinstance(a, fx.Node) and a not in ctx.constants for a in x.args[:2]) else None
    variant = "_".join([
        "upcast" if upcast else "native",
        "weight_first" if steps[:1] == ["weight"] and len(steps) == 2 else "weight_last" if "weight" in steps else "no_weight",
        f"{ndim}d",
    ])
    return Norm(x, add, out, weight, float(eps), variant)


# --- candidates ---------------------------------------------------------------------------------


def _zentorch_add_rms_norm(a, b, weight, eps):
    # zentorch's op is in place (residual <- a + b; input <- norm(residual) * weight) and only
    # right for 2-D input: run it on 2-D copies so the graph stays functional.
    shape = a.shape
    out = a.reshape(-1, shape[-1]).clone()
    residual = b.reshape(-1, shape[-1]).clone()
    torch.ops.zentorch.zentorch_add_rms_norm_(out, weight, residual, eps)
    return residual.view(shape), out.view(shape)


_LIB = torch.library.Library("zen", "FRAGMENT")
_LIB.define("add_rms_norm(Tensor a, Tensor b, Tensor weight, float eps) -> (Tensor, Tensor)")
_LIB.impl("add_rms_norm", lambda a, b, weight, eps: ADD_RMS_NORM_IMPL(a, b, weight, eps), "CPU")
ADD_RMS_NORM_IMPL = _zentorch_add_rms_norm  # the op's body; a name so tests can stand in for zentorch
torch.library.register_fake("zen::add_rms_norm", lambda a, b, weight, eps: (torch.empty_like(a), torch.empty_like(a)), lib=_LIB)


def choose(norm: Norm) -> tuple[str, dict]:
    """Kernel for this norm and the reasons others were not taken."""
    excluded = {}
    reason = zentorch_unavailable()
    if reason is None and norm.residual_add is None:
        reason = "standalone zentorch_rms_norm is left out: zentorch's own vLLM plugin reports accuracy issues with it"
    if reason is None and (norm.weight is None or "_weight_last_" not in norm.variant):
        reason = "zentorch multiplies the weight after the downcast only"
    if reason is None and norm.residual_add is not None and not config.zentorch_add_rmsnorm:
        reason = ("off (config.zentorch_add_rmsnorm): Inductor's fused kernel keeps the residual sum in fp32 where "
                  "zentorch's op rounds it to bf16 as eager does (the test models' logits 0.7-1.6 dB further from fp32 "
                  "with it, benchmarks/results/accuracy.md), and it was no faster")
    if reason is None:
        reason = _verify_zentorch(norm)
    if reason:
        excluded["zentorch_add_rms_norm"] = reason
        return "inductor", excluded
    return "zentorch_add_rms_norm", excluded


def _verify_zentorch(norm: Norm) -> Optional[str]:
    h = fake_value(norm.x).shape[-1]
    g = torch.Generator().manual_seed(0)  # torch's own RNG untouched
    a, b = (torch.randn(2, 7, h, dtype=fake_value(norm.x).dtype, generator=g) for _ in range(2))
    s = (a.float() + b.float())
    ref = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.float()
    try:
        _, y = _zentorch_add_rms_norm(a, b, norm.weight.to(a.dtype), norm.eps)
    except Exception as e:
        return f"failed: {type(e).__name__}: {e}"
    db = sqnr_db(y, ref)
    return None if db >= 40 else f"SQNR {db:.1f} dB < 40 dB against the fp32 reference"


# --- rewrite ------------------------------------------------------------------------------------


def apply(ctx) -> None:
    for rsqrt in list(ctx.graph.find_nodes(op="call_function", target=aten.rsqrt.default)):
        try:
            norm = read(ctx, rsqrt)
        except PatternMiss as miss:
            ctx.record.near_miss(STANDALONE, rsqrt, str(miss))
            continue
        pattern = PATTERN if norm.residual_add is not None else STANDALONE
        kernel, excluded = choose(norm)
        if kernel == "zentorch_add_rms_norm":
            _replace_with_zentorch(ctx, norm)
        ctx.record.match(pattern, norm.variant, norm.out, kernel if kernel != "inductor" else "inductor (kept)", {"all": kernel})
        ctx.record.autotune.append({"source": ctx.record.matches[-1].source, "kind": f"{pattern}_{norm.variant}",
                                    "winner": kernel, "excluded": excluded})


def _replace_with_zentorch(ctx, norm: Norm) -> None:
    add = norm.residual_add
    weight = ctx.add_constant(norm.weight.to(fake_value(norm.x).dtype).contiguous(), add, "norm_weight")
    with ctx.graph.inserting_after(add):  # before every user of the sum
        pair = ctx.graph.call_function(torch.ops.zen.add_rms_norm.default, (add.args[0], add.args[1], weight, norm.eps))
    with ctx.graph.inserting_after(pair):
        normed = ctx.graph.call_function(operator.getitem, (pair, 1))
    with ctx.graph.inserting_after(pair):
        total = ctx.graph.call_function(operator.getitem, (pair, 0))
    pair.meta["val"] = (fake_value(add), fake_value(norm.out))
    total.meta.update(add.meta)
    normed.meta.update(norm.out.meta)
    norm.out.replace_all_uses_with(normed)
    add.replace_all_uses_with(total)


FAMILY = Family(PATTERN, "add_rmsnorm", apply)
