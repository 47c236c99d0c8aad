"""The attention ops zen's graphs call.

``zen::decode_attention``: one query position over a KV cache, in C++ (csrc/decode_attention.cpp,
called by csrc/ops.cpp), reading K and V only where the mask lets some query see them.

    out = zen.decode_attention(q, k, v, mask, scale, k_scale=None, v_scale=None)
        q: [B, H, 1, D]   k, v: [B, Hkv, L, D] (fp32, bf16, or int8 codes, D contiguous)
        k_scale, v_scale: with int8 k and v only, fp32 [B, Hkv, L] or [B, Hkv, L, 1]: K = k * k_scale
        (one scale a KV head and position, as zen_inductor.kv_cache stores them)
        mask: additive, broadcast to [B, H, 1, L], or None
        out: [B, H, 1, D] in q's dtype; a head that sees no position gets 0

``zen::prefill_attention``: a prompt's queries over keys under an additive mask, each block of
queries given only the keys up to the last one any of its rows may see (``mask_extent``, C++ in
csrc/ops.cpp): by zentorch's SDPA a block, else by our flash attention in C++
(csrc/prefill_attention_avx2.cpp, one call), else (AMX's bf16, a layout it does not take) by ATen's
flash attention a block.

    out = zen.prefill_attention(q, k, v, mask, scale, zentorch)
        q: [B, H, L, D]   k, v: [B, Hkv, S, D]   mask: additive, broadcast to [B, H, L, S]
        zentorch: zentorch.zentorch_sdpa runs the blocks, else the kernels after it
        out: [B, H, L, D] contiguous, in q's dtype, what the kernel gives over the whole mask

``zen::unmasked_attention``: a prompt without a mask, by our C++ flash attention alone (where
zentorch cannot run: patterns/prefill_attention.py); ``is_causal`` as ATen's (query l sees keys
0 .. l), else every key.

    out = zen.unmasked_attention(q, k, v, scale, is_causal)    (shapes as above)

Why: given a mask, flash attention computes every (query, key) pair and adds the mask; it skips
the blocks above the diagonal only when told ``is_causal``. Transformers passes a mask whenever the
keys are not exactly the prompt: a static cache (S is the cache's length, its tail unwritten),
padding, a prompt after a cached prefix. Under a causal mask over S = L + 16 keys, blocks of 128
queries cut the work to about half: ATen 69 -> 45 ms at L=2048 and 305 -> 185 ms at 4096 on a
Zen 4 (fp32, 9 query over 3 KV heads, D 64, 2 threads), zentorch's 70 -> 41 and 280 -> 167,
within 1.1-1.3x of the causal kernels' own 41 and 140 ms; a block of 256 or 512 gained less.
A block's keys past its extent are -inf for every row of it: leaving them out changes nothing.
Our C++ kernel ran llama1b's causal prompt of 2048 over a static cache (32 query over 8 KV heads)
in 96 ms against ATen's blocks' 129-141 and its causal kernel's 118-121, fp32 and bf16, capped at
AVX2 on Zen 5 and natively alike (zentorch's blocks natively: 71 ms fp32, 42 bf16).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import cpu, native


_LIB = torch.library.Library("zen", "FRAGMENT")  # the namespace is kernels/op.py's
_LIB.define("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, Tensor? k_scale=None, "
            "Tensor? v_scale=None) -> Tensor")


_LIB.define("prefill_attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale, bool zentorch) -> Tensor")
# one query position by decode_attention, more by prefill_attention, in one program (csrc/ops.cpp)
_LIB.define("prefill_attention.by_rows(Tensor q, Tensor k, Tensor v, Tensor mask, float scale, bool zentorch) -> Tensor")
_LIB.define("mask_extent(Tensor mask, int rows, int block) -> Tensor")  # implemented in csrc/ops.cpp
# a prompt without a mask (ATen's is_causal, top-left, or every key), by our C++ alone
_LIB.define("unmasked_attention(Tensor q, Tensor k, Tensor v, float scale, bool is_causal) -> Tensor")


@torch.library.register_fake("zen::decode_attention", lib=_LIB)
def _fake(q, k, v, mask, scale, k_scale=None, v_scale=None):
    return q.new_empty(q.shape)


@torch.library.register_fake("zen::prefill_attention", lib=_LIB)
def _prefill_fake(q, k, v, mask, scale, zentorch):
    return q.new_empty(q.shape)


torch.library.register_fake("zen::prefill_attention.by_rows", _prefill_fake, lib=_LIB)


@torch.library.register_fake("zen::unmasked_attention", lib=_LIB)
def _unmasked_fake(q, k, v, scale, is_causal):
    return q.new_empty(q.shape)


QUERY_BLOCK = 128  # queries a block (the measurements above)
_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


PREFILL_NATIVE = "prefill_attention_avx2"


def native_prefill_unavailable(dtype: torch.dtype, head_dim: int) -> Optional[str]:
    """Why our C++ flash attention does not run a prompt of this dtype and head size (ATen's
    flash attention does, block by block), or None."""
    if dtype not in (torch.float32, torch.bfloat16):
        return f"{dtype} attention"
    if head_dim % 16 or head_dim > 256:
        return f"head size {head_dim} (it takes multiples of 16 up to 256)"
    if dtype == torch.bfloat16 and cpu.amx_bf16():
        return "bf16 on a CPU with AMX, where ATen's flash attention runs on it"
    return native.unavailable(PREFILL_NATIVE)


def _native_prefill_fits(q, k, v, mask=None) -> bool:
    return (q.shape[2] > 0 and native_prefill_unavailable(q.dtype, q.shape[-1]) is None and k.dtype == v.dtype == q.dtype
            and (mask is None or mask.dtype in (torch.float32, torch.bfloat16)) and q.shape[1] % k.shape[1] == 0
            and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1)


def _native_prefill(q, k, v, mask, scale, extents, causal=False):
    batch, heads, length, head_dim = q.shape
    keys = k.shape[2]
    if mask is not None:
        mask = mask.expand(batch, heads, length, keys)
        mask = mask if mask.stride(-1) == 1 else mask.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype)
    plain = _NO_MASK if mask is None else mask
    native.load(PREFILL_NATIVE)(q, k, v, plain, out, extents, batch, heads, k.shape[1], length, keys, head_dim, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                                *((0, 0, 0) if mask is None else mask.stride()[:3]), int(mask is not None), int(causal),
                                int(q.dtype == torch.bfloat16), int(plain.dtype == torch.bfloat16),
                                torch.tensor([scale], dtype=torch.float32))
    return out


_NO_MASK = torch.empty(0, dtype=torch.float32)


@torch.library.impl("zen::unmasked_attention", "CPU", lib=_LIB)
def _unmasked(q, k, v, scale, is_causal):
    length, keys = q.shape[2], k.shape[2]
    if not _native_prefill_fits(q, k, v):  # a layout the C++ does not take: ATen's flash attention, on KV heads
        groups = q.shape[1] // k.shape[1]
        k, v = (t.repeat_interleave(groups, 1) for t in (k, v))
        return _FLASH(q, k, v, 0.0, is_causal, scale=scale)[0].contiguous()
    ends = torch.arange(1, (length + QUERY_BLOCK - 1) // QUERY_BLOCK + 1) * QUERY_BLOCK
    extents = ends.clamp_(max=keys) if is_causal else torch.full_like(ends, keys)
    return _native_prefill(q, k, v, None, scale, extents, causal=is_causal)


@torch.library.impl("zen::prefill_attention", "CPU", lib=_LIB)
def _prefill(q, k, v, mask, scale, zentorch):
    length = q.shape[2]
    extents = _mask_extent(mask, length)
    if not zentorch and _native_prefill_fits(q, k, v, mask):
        return _native_prefill(q, k, v, mask, scale, extents.contiguous())
    kernel = torch.ops.zentorch.zentorch_sdpa.default if zentorch else _FLASH
    extents = extents.tolist()
    per_row = mask.shape[-2] != 1
    out = q.new_empty(q.shape)
    for j, end in enumerate(extents):
        rows = slice(j * QUERY_BLOCK, min(length, (j + 1) * QUERY_BLOCK))
        block_mask = mask[..., rows, :end] if per_row else mask[..., :end]
        out[:, :, rows] = kernel(q[:, :, rows], k[:, :, :end], v[:, :, :end], 0.0, False, attn_mask=block_mask,
                                 scale=scale)[0]
    return out


def _mask_extent(mask: torch.Tensor, rows: int) -> torch.Tensor:
    """zen::mask_extent where the C++ ops load; else the same from torch's ops, which read the whole
    mask more than once (~14 ms a call at 4096 x 4112, against ~2 in C++)."""
    if native.op_library_unavailable() is None:
        return torch.ops.zen.mask_extent(mask, rows, QUERY_BLOCK)
    visible = (~torch.isneginf(mask.reshape(-1, mask.shape[-2], mask.shape[-1]))).any(0)
    if visible.shape[0] == 1:
        visible = visible.expand(rows, -1)
    blocks = torch.nn.functional.pad(visible, (0, 0, 0, -rows % QUERY_BLOCK)).reshape(-1, QUERY_BLOCK, visible.shape[-1])
    seen = blocks.any(1)
    last = torch.where(seen, torch.arange(1, seen.shape[-1] + 1), 0).amax(-1)
    return last.clamp_min(1)


decode_attention = torch.ops.zen.decode_attention.default
prefill_attention = torch.ops.zen.prefill_attention.default
attention_by_rows = torch.ops.zen.prefill_attention.by_rows
unmasked_attention = torch.ops.zen.unmasked_attention.default


def unavailable() -> Optional[str]:
    """Why the kernel cannot run here (it is built and bound on the first ask), or None. Where the
    CPU has AVX-512 its 16-lane build is bound too, and the op calls that one."""
    reason = native.unavailable("decode_attention")
    if reason is None and native.missing_isa("decode_attention_avx512") is None:
        native.unavailable("decode_attention_avx512")  # a build that fails leaves the AVX2 one, with a warning
    return reason
