"""zen::decode_attention (csrc/decode_attention.cpp) against ATen's SDPA with the masks decode meets."""
import math

import pytest
import torch

from zen_inductor.attention import decode_attention, unavailable
from zen_inductor.kv_cache import dequantize, quantize

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_mask_of_its_own_for_each_head(dtype):
    """A [B, H, 1, L] mask (each query head its own row, read as it lies) and one broadcast along
    the positions (stride 0, read value by value) give SDPA's answer."""
    torch.manual_seed(0)
    q = torch.randn(1, 8, 1, 64, dtype=dtype)
    k, v = (torch.randn(1, 2, 200, 64, dtype=dtype) for _ in range(2))
    per_head = torch.zeros(1, 8, 1, 200, dtype=dtype)
    for h in range(8):
        per_head[:, h, :, 20 * h + 30:] = float("-inf")
    broadcast = torch.zeros(1, 8, 1, 1, dtype=dtype).expand(1, 8, 1, 200)
    for mask in (per_head, broadcast):
        out = decode_attention(q, k, v, mask, 0.125)
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.float(),
                                                               scale=0.125, enable_gqa=True)
        assert (out.float() - ref).norm() / ref.norm() < (1e-5 if dtype == torch.float32 else 1e-2)


def test_a_head_that_sees_nothing_gets_zero():
    q, k, v = torch.randn(1, 2, 1, 32), torch.randn(1, 1, 10, 32), torch.randn(1, 1, 10, 32)
    mask = torch.full((1, 1, 1, 10), float("-inf"))
    assert torch.equal(decode_attention(q, k, v, mask, 0.1), torch.zeros(1, 2, 1, 32))


def test_int8_keys_and_values_read_with_their_scales():
    """int8 codes with one scale a KV head and position (zen_inductor.kv_cache's layout) give SDPA's
    answer on the values they stand for; scales as [B, Hkv, L, 1] or [B, Hkv, L] alike."""
    torch.manual_seed(0)
    q = torch.randn(2, 8, 1, 64)
    (kc, ks), (vc, vs) = (quantize(torch.randn(2, 2, 300, 64) * torch.rand(2, 2, 300, 1) * 4) for _ in range(2))
    mask = torch.zeros(2, 1, 1, 300)
    mask[..., 200:] = float("-inf")
    mask[1, ..., :5] = float("-inf")
    ref = torch.nn.functional.scaled_dot_product_attention(q, dequantize(kc, ks, torch.float32), dequantize(vc, vs, torch.float32),
                                                           attn_mask=mask, enable_gqa=True)
    for scales in ((ks, vs), (ks[..., 0], vs[..., 0])):
        out = decode_attention(q, kc, vc, mask, 0.125, *scales)
        assert (out - ref).norm() / ref.norm() < 1e-5
    with pytest.raises(RuntimeError, match="k_scale and v_scale"):
        decode_attention(q, kc, vc, mask, 0.125)


def _call_build(library, q, k, v, mask, scale, k_scale=None, v_scale=None):
    """One build's C entry, called as zen::decode_attention calls it (the op takes the AVX-512 build
    wherever it is bound, so the AVX2 one is reached here only)."""
    import ctypes

    from zen_inductor import native

    entry = native.load(library).kernel
    out = torch.empty(q.shape[0], q.shape[1], q.shape[3])
    qf = q.float().contiguous()
    kind = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}[k.dtype]
    k_scale, v_scale = (t.contiguous() if t is not None else qf for t in (k_scale, v_scale))
    scale_c = ctypes.c_float(scale)
    ptr = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
    words = [ptr(qf), ptr(k), ptr(v), ptr(mask), ptr(out), ctypes.cast(ctypes.pointer(scale_c), ctypes.c_void_p),
             *(ctypes.c_int64(w) for w in (q.shape[0], q.shape[1], k.shape[1], k.shape[2], q.shape[3], *k.stride()[:3],
                                            *v.stride()[:3], *(mask.stride(i) if mask.shape[i] > 1 else 0 for i in (0, 1, 3)),
                                            1, kind)), ptr(k_scale), ptr(v_scale)]
    entry(*words)
    return out


def _case(dtype, b, h, hkv, length, d):
    """q, K and V as the kernel reads them (int8: codes, with their scales) and K and V's values in fp32."""
    if dtype == torch.int8:
        (k, ks), (v, vs) = (quantize(torch.randn(b, hkv, length, d)) for _ in range(2))
        return torch.randn(b, h, 1, d), k, v, dequantize(k, ks, torch.float32), dequantize(v, vs, torch.float32), (ks, vs)
    q = torch.randn(b, h, 1, d, dtype=dtype)
    k, v = (torch.randn(b, hkv, length, d, dtype=dtype) for _ in range(2))
    return q, k, v, k.float(), v.float(), ()


@pytest.mark.parametrize("library", ["decode_attention", "decode_attention_avx512"])
@pytest.mark.parametrize("d,dtype", [(64, torch.float32), (64, torch.bfloat16), (80, torch.float32), (36, torch.bfloat16),
                                     (64, torch.int8), (36, torch.int8)])
def test_each_build_matches_sdpa(library, d, dtype):
    """Both lane widths (8 and 16) against SDPA, head sizes whose tails each width handles apart;
    int8 codes against SDPA on the values they stand for."""
    from zen_inductor import native

    if native.unavailable(library) is not None:
        pytest.skip(native.unavailable(library))
    torch.manual_seed(0)
    q, k, v, k_values, v_values, scales = _case(dtype, 1, 8, 2, 301, d)
    mask = torch.zeros(1, 1, 1, 301)
    mask[..., 250:] = float("-inf")
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k_values, v_values, attn_mask=mask, enable_gqa=True)
    out = _call_build(library, q, k, v, mask, 1 / math.sqrt(d), *scales)
    assert (out - ref[:, :, 0]).norm() / ref.norm() < 1e-5


@pytest.mark.parametrize("library", ["decode_attention", "decode_attention_avx512"])
@pytest.mark.parametrize("group,d", [(2, 64), (3, 64), (4, 64), (2, 128), (4, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_a_group_of_queries_read_together_matches_sdpa(library, group, d, dtype):
    """Both builds read each K and V row once for the 2-4 queries sharing it: each query's own mask
    (one query of each group sees a window only, the second sequence is left-padded) must still hold."""
    from zen_inductor import native

    if native.unavailable(library) is not None:
        pytest.skip(native.unavailable(library))
    torch.manual_seed(group * d)
    b, hkv, length = 2, 2, 333
    h = hkv * group
    q, k, v, k_values, v_values, scales = _case(dtype, b, h, hkv, length, d)
    mask = torch.zeros(b, h, 1, length)
    mask[..., 300:] = float("-inf")  # unwritten
    mask[:, 1::group, :, :140] = float("-inf")  # a sliding window for one query of each group
    mask[1, ..., :9] = float("-inf")  # left padding of the second sequence
    out = _call_build(library, q, k, v, mask, 1 / math.sqrt(d), *scales)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k_values, v_values, attn_mask=mask, enable_gqa=True)
    assert (out - ref[:, :, 0]).norm() / ref.norm() < 1e-5
