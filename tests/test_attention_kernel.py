"""zen::decode_attention (csrc/decode_attention.cpp) against ATen's SDPA with the masks decode meets."""
import math

import pytest
import torch

from zen_inductor.attention import decode_attention, unavailable

pytestmark = pytest.mark.skipif(unavailable() is not None, reason="decode_attention cannot be built here")


@pytest.mark.parametrize("b,h,hkv,length,d,dtype", [(1, 9, 3, 148, 64, torch.float32), (2, 8, 2, 300, 128, torch.bfloat16),
                                                    (1, 4, 4, 1030, 64, torch.float32)])
def test_decode_attention_matches_sdpa_with_a_static_cache_mask(b, h, hkv, length, d, dtype):
    torch.manual_seed(0)
    q = torch.randn(b, h, 1, d, dtype=dtype)
    k, v = (torch.randn(b, hkv, length, d, dtype=dtype) for _ in range(2))
    mask = torch.zeros(b, 1, 1, length, dtype=dtype)
    mask[..., length // 3:] = float("-inf")  # the unwritten tail of a static cache
    mask[..., 0] = float("-inf")  # left padding
    out = decode_attention(q, k, v, mask, 1 / math.sqrt(d))
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.float(),
                                                           enable_gqa=True)
    assert out.dtype == dtype and out.shape == q.shape
    assert (out.float() - ref).norm() / ref.norm() < (1e-5 if dtype == torch.float32 else 1e-2)


def test_a_head_that_sees_nothing_gets_zero():
    q, k, v = torch.randn(1, 2, 1, 32), torch.randn(1, 1, 10, 32), torch.randn(1, 1, 10, 32)
    mask = torch.full((1, 1, 1, 10), float("-inf"))
    assert torch.equal(decode_attention(q, k, v, mask, 0.1), torch.zeros(1, 2, 1, 32))
