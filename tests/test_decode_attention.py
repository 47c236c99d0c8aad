"""decode_attention: one query position over the KV cache, as bmm + softmax + bmm, or by
zen.decode_attention (C++) with config.native_decode_attention."""
import pytest
import torch
import torch.nn.functional as F

import zen_inductor
from zen_inductor import attention

from conftest import compile_zen, compiled_graphs, reports_since, sqnr


class Attend(torch.nn.Module):
    def __init__(self, causal=False):
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, is_causal=self.causal) * 2


def _fp32(q, k, v):
    g = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    return torch.softmax(q.float() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v * 2


def _replacement(after: str) -> str:
    """Which replacement the graph holds: "native" (our C++ op) or "gemms" (two bmm), or "" if neither."""
    if "zen.decode_attention" in after and "aten.bmm" not in after:
        return "native"
    return "gemms" if after.count("aten.bmm") == 2 else ""


# the GEMMs (the default), and the C++ op where it builds
PATHS = [pytest.param(True, marks=pytest.mark.skipif(attention.unavailable() is not None, reason="needs AVX2 and a C++ compiler")), False]


@pytest.mark.parametrize("native", PATHS)
@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4)])
def test_decode_attention_replaces_flash_attention(tmp_path, heads, kv_heads, native):
    fast = compile_zen(Attend())
    compiles_before = compiled_graphs()
    with torch.no_grad(), zen_inductor.config.patch(debug_dir=str(tmp_path), native_decode_attention=native):
        for length in (5, 37, 160):  # one graph: the cache length is dynamic, heads and head size are not
            q = torch.randn(1, heads, 1, 64).to(torch.bfloat16)
            k, v = (torch.randn(1, kv_heads, length, 64).to(torch.bfloat16) for _ in range(2))
            torch._dynamo.mark_dynamic(k, 2)
            torch._dynamo.mark_dynamic(v, 2)
            ref = _fp32(q, k, v)
            assert sqnr(fast(q, k, v), ref) >= sqnr(Attend()(q, k, v), ref) - 0.5, length
    assert zen_inductor.counters["decode_attention." + ("gqa" if heads != kv_heads else "mha")] >= 1
    with open(tmp_path / "LATEST") as f, open(f.read().strip() + "/after.py") as g:
        after = g.read()
    assert "flash_attention" not in after and _replacement(after) == ("native" if native else "gemms")
    assert len(reports_since(compiles_before)) == 1  # no recompiles across lengths


def test_causal_or_prefill_attention_is_left_alone():
    q = torch.randn(1, 4, 1, 32).to(torch.bfloat16)
    k, v = (torch.randn(1, 4, 9, 32).to(torch.bfloat16) for _ in range(2))
    with torch.no_grad():
        causal = compile_zen(Attend(causal=True))(q, k, v)
    assert torch.allclose(causal.float(), Attend(causal=True)(q, k, v).float(), atol=2e-2)  # key 0 only, as eager
    (miss,) = zen_inductor.last_report()["near_misses"]
    assert "is_causal" in miss["reason"]
    torch._dynamo.reset()
    zen_inductor.counters.clear()
    with torch.no_grad():  # prefill: several query positions are not decode_attention's, silently
        compile_zen(Attend())(torch.randn(1, 4, 6, 32).to(torch.bfloat16), k, v)
    misses = zen_inductor.last_report()["near_misses"]
    assert zen_inductor.counters["decode_attention"] == 0 and all(m["pattern"] != "decode_attention" for m in misses)


class AttendMasked(torch.nn.Module):
    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True) * 2


def _fp32_masked(q, k, v, mask):
    g = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    return F.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask if mask.dtype == torch.bool else mask.float()) * 2


@pytest.mark.parametrize("native", PATHS)
@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_decode_attention_with_the_mask_of_a_static_cache(mask_kind, dumped, native):
    """transformers passes a mask with every StaticCache: the positions not written yet are masked.
    A fully masked row gives 0, as flash attention does (not the NaN of a plain softmax)."""
    fast = compile_zen(AttendMasked())
    with torch.no_grad(), zen_inductor.config.patch(native_decode_attention=native):
        for filled in (3, 50):  # one graph: the cache is preallocated, the mask moves
            q = torch.randn(2, 8, 1, 64).to(torch.bfloat16)
            k, v = (torch.randn(2, 2, 64, 64).to(torch.bfloat16) for _ in range(2))
            allowed = torch.arange(64) < filled
            mask = allowed.expand(2, 1, 1, 64).clone()
            mask[1] = False  # the second sequence: every position masked
            if mask_kind == "additive":
                mask = torch.zeros(mask.shape, dtype=torch.bfloat16).masked_fill_(~mask, float("-inf"))
            out, eager = fast(q, k, v, mask), AttendMasked()(q, k, v, mask)
            ref = _fp32_masked(q, k, v, mask)
            assert sqnr(out[0], ref[0]) >= sqnr(eager[0], ref[0]) - 0.5, filled
            assert torch.equal(out[1], eager[1]) and not out[1].any()  # zeros, as flash attention gives
    assert zen_inductor.counters["decode_attention.gqa_masked"] == 1
    assert "flash_attention" not in dumped("after.py") and _replacement(dumped("after.py")) == ("native" if native else "gemms")


class RepeatThenAttend(torch.nn.Module):
    """transformers' SDPA path when it passes a mask: K and V repeated over the query heads first."""

    def forward(self, q, k, v, mask):
        b, hkv, length, d = k.shape
        group = q.shape[1] // hkv
        k, v = (t[:, :, None, :, :].expand(b, hkv, group, length, d).reshape(b, hkv * group, length, d) for t in (k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("native", PATHS)
def test_the_cache_is_read_before_repeat_kv_copies_it(tmp_path, native):
    """The replacement reads K and V per KV head from the cache itself: the G copies that
    repeat_kv makes (written and read at every step, per layer) leave the graph."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 9, 1, 64), torch.randn(1, 3, 40, 64), torch.randn(1, 3, 40, 64)
    mask = torch.zeros(1, 1, 1, 40)
    mask[..., 30:] = float("-inf")  # a static cache's unwritten tail
    with torch.no_grad(), zen_inductor.config.patch(debug_dir=str(tmp_path), native_decode_attention=native):
        out = compile_zen(RepeatThenAttend())(q, k, v, mask)
    assert zen_inductor.counters["decode_attention.gqa_masked"] == 1
    with open(tmp_path / "LATEST") as f, open(f.read().strip() + "/after.py") as g:
        after = g.read()
    assert _replacement(after) == ("native" if native else "gemms")
    assert "aten.clone" not in after and after.count("aten.expand") == (0 if native else 1)  # the mask's, for the GEMMs
    assert sqnr(out, RepeatThenAttend()(q, k, v, mask)) >= 60
