"""``zen::decode_attention``: one query position over a KV cache, in C++ (csrc/decode_attention.cpp,
called by csrc/ops.cpp), reading K and V only where the mask lets some query see them.

    out = zen.decode_attention(q, k, v, mask, scale)
        q: [B, H, 1, D]   k, v: [B, Hkv, L, D] (fp32 or bf16, D contiguous)   mask: additive, broadcast to
        [B, H, 1, L], or None   out: [B, H, 1, D] in q's dtype; a head that sees no position gets 0
"""
from __future__ import annotations

from typing import Optional

import torch

from . import native


_LIB = torch.library.Library("zen", "FRAGMENT")  # the namespace is kernels/op.py's
_LIB.define("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor")


@torch.library.register_fake("zen::decode_attention", lib=_LIB)
def _fake(q, k, v, mask, scale):
    return q.new_empty(q.shape)


decode_attention = torch.ops.zen.decode_attention.default


def unavailable() -> Optional[str]:
    """Why the kernel cannot run here (it is built and bound on the first ask), or None."""
    return native.unavailable("decode_attention")
