"""``zen::decode_attention``: one query position over a KV cache, in C++ (csrc/decode_attention.cpp,
called by csrc/ops.cpp), reading K and V only where the mask lets some query see them.

    out = zen.decode_attention(q, k, v, mask, scale, k_scale=None, v_scale=None)
        q: [B, H, 1, D]   k, v: [B, Hkv, L, D] (fp32, bf16, or int8 codes, D contiguous)
        k_scale, v_scale: with int8 k and v only, fp32 [B, Hkv, L] or [B, Hkv, L, 1]: K = k * k_scale
        (one scale a KV head and position, as zen_inductor.kv_cache stores them)
        mask: additive, broadcast to [B, H, 1, L], or None
        out: [B, H, 1, D] in q's dtype; a head that sees no position gets 0
"""
from __future__ import annotations

from typing import Optional

import torch

from . import native


_LIB = torch.library.Library("zen", "FRAGMENT")  # the namespace is kernels/op.py's
_LIB.define("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, Tensor? k_scale=None, "
            "Tensor? v_scale=None) -> Tensor")


@torch.library.register_fake("zen::decode_attention", lib=_LIB)
def _fake(q, k, v, mask, scale, k_scale=None, v_scale=None):
    return q.new_empty(q.shape)


decode_attention = torch.ops.zen.decode_attention.default


def unavailable() -> Optional[str]:
    """Why the kernel cannot run here (it is built and bound on the first ask), or None. Where the
    CPU has AVX-512 its 16-lane build is bound too, and the op calls that one."""
    reason = native.unavailable("decode_attention")
    if reason is None and native.missing_isa("decode_attention_avx512") is None:
        native.unavailable("decode_attention_avx512")  # a build that fails leaves the AVX2 one, with a warning
    return reason
