"""prefill_attention: attention over a prompt, by zentorch_sdpa where it is ahead, and under a mask by blocks
given only the keys they may see."""
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import zen_inductor
from zen_inductor import config
from zen_inductor.cpu import amx_bf16, zentorch_unavailable
from zen_inductor.patterns.prefill_attention import AMX_REASON

from conftest import compile_zen, sqnr


class CausalAttend(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, is_causal=True) * 2


def _fp32(q, k, v):
    g = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    return F.scaled_dot_product_attention(q.float(), k, v, is_causal=True) * 2


def _qkv(length, heads=8, kv_heads=2, dtype=torch.bfloat16):
    # as a Llama layer gives them: [B, L, H, D] projections transposed to [B, H, L, D], not contiguous
    q = torch.randn(1, length, heads, 64).transpose(1, 2).to(dtype)
    k, v = (torch.randn(1, length, kv_heads, 64).transpose(1, 2).to(dtype) for _ in range(2))
    for t in (q, k, v):
        torch._dynamo.mark_dynamic(t, 2)
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prefill_attention_runs_zentorch_sdpa(dumped, dtype):
    """zentorch_sdpa where it is ahead; where zentorch cannot run, our C++ (zen.unmasked_attention,
    causal); ATen's flash attention, with the reason, where the CPU runs bf16 attention on AMX."""
    from zen_inductor import attention

    fast = compile_zen(CausalAttend())
    with torch.no_grad():
        for length in (5, 37, 128):  # one graph: the prompt length is dynamic
            q, k, v = _qkv(length, dtype=dtype)
            ref = _fp32(q, k, v)
            # fp32 eager is the reference itself (inf dB): 100 dB is as close as a kernel must be
            assert sqnr(fast(q, k, v), ref) >= min(sqnr(CausalAttend()(q, k, v), ref), 100) - 0.5, length
    unavailable = zentorch_unavailable() or (AMX_REASON if dtype == torch.bfloat16 and amx_bf16() else None)
    if unavailable and attention.native_prefill_unavailable(dtype, 64) is None:  # ours, on the KV heads
        assert zen_inductor.counters["prefill_attention.gqa_causal"] == 1
        after = dumped("after.py")
        assert "zen.unmasked_attention" in after and "flash_attention" not in after
        (match,) = [m for m in zen_inductor.last_report()["matches"] if m["pattern"] == "prefill_attention"]
        assert unavailable in match["replacement"]
    elif unavailable:  # the flash attention stays, and the dump says why
        (miss,) = zen_inductor.last_report()["near_misses"]
        assert unavailable in miss["reason"] and "flash_attention" in dumped("after.py")
        assert zen_inductor.counters["prefill_attention.near_miss"] == 1  # one compile for the three lengths
    else:
        assert zen_inductor.counters["prefill_attention.gqa"] == 1  # one compile for the three lengths
        after = dumped("after.py")
        assert "zentorch.zentorch_sdpa" in after and "flash_attention" not in after


@pytest.mark.parametrize("why", ["fp16", "zentorch off"])
def test_prefill_attention_near_misses_stay_correct(why):
    """Without zentorch's kernel: fp16 stays with ATen (a near miss, its reason given), and with
    zentorch off our C++ runs the prompt where it builds."""
    from zen_inductor import attention

    dtype = torch.float16 if why == "fp16" else torch.bfloat16
    q, k, v = _qkv(24, dtype=dtype)
    with torch.no_grad(), config.patch(use_zentorch=why != "zentorch off"):
        out = compile_zen(CausalAttend())(q, k, v)
    ref = _fp32(q, k, v)
    assert sqnr(out, ref) >= sqnr(CausalAttend()(q, k, v), ref) - 0.5
    if why == "zentorch off" and attention.native_prefill_unavailable(dtype, 64) is None:
        assert zen_inductor.counters["prefill_attention.gqa_causal"] == 1  # ours instead
        (match,) = [m for m in zen_inductor.last_report()["matches"] if m["pattern"] == "prefill_attention"]
        assert "zentorch disabled" in match["replacement"]
        return
    assert zen_inductor.counters["prefill_attention"] == 0
    (miss,) = zen_inductor.last_report()["near_misses"]
    assert miss["pattern"] == "prefill_attention"
    # the first reason given: without zentorch's ISA (an AVX2 CPU) that one, before the dtype
    expected = "zentorch disabled" if why == "zentorch off" else zentorch_unavailable() or "float16"
    assert expected in miss["reason"]


# --- under a mask: the blocks of queries given only the keys they may see ----------------------

NEG_INF = float("-inf")
FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


def _static_cache_mask(length, keys, pads=(0,), dtype=torch.float32):
    """What transformers passes over a static cache of ``keys`` positions: causal, the unwritten tail
    hidden, and for each sequence its left padding hidden from every query ([B, 1, L, S])."""
    rows = torch.arange(length)[:, None]
    cols = torch.arange(keys)[None]
    masks = [torch.where((cols <= rows) & (cols >= pad), 0.0, NEG_INF) for pad in pads]
    return torch.stack(masks)[:, None].to(dtype)


def _extent_by_hand(mask, rows, block):
    visible = (mask != NEG_INF).reshape(-1, mask.shape[-2], mask.shape[-1]).any(0).expand(rows, -1)
    ends = []
    for r0 in range(0, rows, block):
        seen = visible[r0:r0 + block].any(0).nonzero()
        ends.append(int(seen[-1]) + 1 if len(seen) else 1)
    return ends


@pytest.mark.parametrize("zentorch", [False, True])
@pytest.mark.parametrize("case", ["static cache", "left padding", "padding only", "bf16"])
def test_prefill_attention_under_a_mask_equals_flash_attention(case, zentorch):
    """The blocks' output is flash attention's over the whole mask, whatever the mask hides: the
    static cache's tail, whole padded rows (which get 0), or keys only ([B, 1, 1, S])."""
    if zentorch and zentorch_unavailable():
        pytest.skip(zentorch_unavailable())  # the ATen case runs the same blocks
    from zen_inductor import attention

    torch.manual_seed(0)
    dtype = torch.bfloat16 if case == "bf16" else torch.float32
    length, keys = 300, 316  # three blocks, the last one partial
    pads = (0, 37) if case in ("left padding", "padding only") else (0,)
    mask = _static_cache_mask(length, keys, pads, dtype)
    if case == "padding only":
        mask = mask[:, :, -1:]  # every query sees the same keys
    q = torch.randn(len(pads), 9, length, 64, dtype=dtype)
    k, v = (torch.randn(len(pads), 3, keys, 64, dtype=dtype) for _ in range(2))
    out = attention.prefill_attention(q, k, v, mask, 0.125, zentorch)
    ref = FLASH(q, k, v, 0.0, False, attn_mask=mask, scale=0.125)[0]
    assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous()
    assert sqnr(out, ref) >= (40 if dtype == torch.bfloat16 else 100)
    if case == "left padding":  # the padded queries see nothing
        assert not out[1, :, :37].any()
    assert torch.ops.zen.mask_extent(mask, length, attention.QUERY_BLOCK).tolist() == _extent_by_hand(
        mask, length, attention.QUERY_BLOCK)
    if case == "static cache":  # three blocks, each given the keys up to its diagonal
        assert torch.ops.zen.mask_extent(mask, length, attention.QUERY_BLOCK).tolist() == [128, 256, 300]


@settings(max_examples=30, derandomize=True, deadline=None)
@given(rows=st.integers(1, 300), keys=st.integers(1, 300), planes=st.integers(1, 3), row_mask=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 2**16))
def test_mask_extent_is_the_last_key_a_block_may_see(rows, keys, planes, row_mask, dtype, seed):
    """Any mask: each entry hidden or not at random, whole rows and columns hidden, the last key
    shown or not; the C++ scan (which reads the last stretch first, then forwards) agrees with a
    reading of every entry."""
    from zen_inductor import attention

    g = torch.Generator().manual_seed(seed)
    shown = torch.rand(planes, rows if row_mask else 1, keys, generator=g) < torch.rand(1, generator=g) ** 3
    shown[:, :, torch.rand(keys, generator=g) < 0.5] = False  # whole columns, often the tail
    mask = torch.where(shown, torch.randn(shown.shape, generator=g), NEG_INF).to(dtype)[:, None]
    assert torch.ops.zen.mask_extent(mask, rows, attention.QUERY_BLOCK).tolist() == _extent_by_hand(
        mask, rows, attention.QUERY_BLOCK)


class RepeatedKVAttend(torch.nn.Module):
    """A Llama layer's attention as transformers' SDPA path runs it with a mask: K and V repeated over
    the query heads (``repeat_kv``), the mask sliced to the keys."""

    def forward(self, q, k, v, mask):
        b, hkv, s, d = k.shape
        g = q.shape[1] // hkv
        k = k[:, :, None].expand(b, hkv, g, s, d).reshape(b, hkv * g, s, d)
        v = v[:, :, None].expand(b, hkv, g, s, d).reshape(b, hkv * g, s, d)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, :, :, :s]) * 2


def test_a_masked_prefill_graph_runs_the_blocks_on_the_cache(dumped):
    """The compiled graph holds zen.prefill_attention, on the cache's KV heads (not repeat_kv's copy),
    and gives flash attention's answer for prompts of several lengths (one graph)."""
    fast = compile_zen(RepeatedKVAttend())
    with torch.no_grad():
        for length in (20, 200):
            q = torch.randn(1, 8, length, 64)
            k, v = torch.randn(1, 2, 256, 64), torch.randn(1, 2, 256, 64)
            mask = _static_cache_mask(length, 256)
            for t in (q, mask):
                torch._dynamo.mark_dynamic(t, 2)
            assert sqnr(fast(q, k, v, mask), RepeatedKVAttend()(q, k, v, mask)) >= 100, length
    assert zen_inductor.counters["prefill_attention.gqa_masked"] == 1
    after = dumped("after.py")
    assert "zen.prefill_attention" in after and "flash_attention" not in after
    assert "expand" not in after  # K and V go to the kernel as the cache holds them


class TwoLayersBoolMask(torch.nn.Module):
    """Two attention calls given the model's one boolean mask, as transformers passes it to every
    layer (SDPA turns it into an additive mask at each call)."""

    def forward(self, q, k, v, allowed):
        first = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
        return F.scaled_dot_product_attention(first * 0.5, k, v, attn_mask=allowed, enable_gqa=True)


def test_the_layers_share_one_additive_mask(dumped):
    """Both zen.prefill_attention calls read one conversion of the boolean mask, not one each."""
    q, k, v = torch.randn(1, 8, 40, 64), torch.randn(1, 2, 48, 64), torch.randn(1, 2, 48, 64)
    allowed = _static_cache_mask(40, 48) == 0
    with torch.no_grad():
        out = compile_zen(TwoLayersBoolMask())(q, k, v, allowed)
    assert sqnr(out, TwoLayersBoolMask()(q, k, v, allowed)) >= 100
    assert zen_inductor.counters["prefill_attention.gqa_masked"] == 2
    masks = re.findall(r"prefill_attention\.default\(\w+, \w+, \w+, (\w+),", dumped("after.py"))
    assert len(masks) == 2 and masks[0] == masks[1]


# --- our flash attention in C++, where zentorch does not run ------------------------------------


def _reference(q, k, v, mask, scale):
    """softmax(q k^T scale + mask) v in fp64 over the KV heads each query head shares; a query that
    sees no key gets 0."""
    g = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(g, 1) for t in (k, v))
    scores = q.double() @ k.transpose(-1, -2) * scale + mask.double()
    weights = torch.softmax(scores, -1).nan_to_num(0.0)
    return weights @ v


def _ran_aten_flash(call) -> bool:
    with torch.profiler.profile() as prof:
        call()
    return any("flash_attention" in e.name for e in prof.events())


@settings(max_examples=25, derandomize=True, deadline=None)
@given(batch=st.integers(1, 2), kv_heads=st.integers(1, 3), group=st.integers(1, 4), length=st.integers(1, 260),
       extra=st.integers(0, 80), head_dim=st.sampled_from([16, 64, 128]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       mask_kind=st.sampled_from(["causal", "random", "keys only", "is_causal", "none"]), layout=st.sampled_from(["contiguous", "as projected"]),
       seed=st.integers(0, 2**16))
def test_our_flash_attention_is_softmax_attention(batch, kv_heads, group, length, extra, head_dim, dtype, mask_kind,
                                                  layout, seed):
    """Any shape, GQA group, mask (causal over a static cache with its tail unwritten, entries and
    whole rows hidden at random, one row of keys for every query; none, causal from the top left as
    ATen's is_causal, or every key) and layout of q, k, v: the C++ kernel runs (no ATen flash
    attention) and gives softmax attention computed in fp64, rows that see nothing 0."""
    from zen_inductor import attention

    why = attention.native_prefill_unavailable(dtype, head_dim)
    if why is not None:  # zentorch runs prompts where it can; ours is for the rest
        pytest.skip(why)
    g = torch.Generator().manual_seed(seed)
    keys, heads = length + extra, kv_heads * group
    if layout == "contiguous":
        q = torch.randn(batch, heads, length, head_dim, generator=g).to(dtype)
        k, v = (torch.randn(batch, kv_heads, keys, head_dim, generator=g).to(dtype) for _ in range(2))
    else:  # [B, L, H, D] projections seen as [B, H, L, D]
        q = torch.randn(batch, length, heads, head_dim, generator=g).to(dtype).transpose(1, 2)
        k, v = (torch.randn(batch, keys, kv_heads, head_dim, generator=g).to(dtype).transpose(1, 2) for _ in range(2))
    if mask_kind == "causal":
        mask = _static_cache_mask(length, keys, (0,) * batch, dtype)
        mask[..., keys - extra // 2:] = NEG_INF  # the unwritten tail
    elif mask_kind in ("is_causal", "none"):
        mask = torch.zeros(length, keys, dtype=dtype)
        if mask_kind == "is_causal":
            mask = mask.masked_fill(torch.ones(length, keys, dtype=torch.bool).triu(1), NEG_INF)
        mask = mask.expand(batch, 1, length, keys)
    else:
        rows = 1 if mask_kind == "keys only" else length
        shown = torch.rand(batch, 1, rows, keys, generator=g) < 0.7
        shown[:, :, torch.rand(rows, generator=g) < 0.1] = False  # rows that see nothing
        mask = torch.where(shown, torch.randn(shown.shape, generator=g), NEG_INF).to(dtype)
    scale = head_dim ** -0.5
    if mask_kind in ("is_causal", "none"):
        def attend():
            return attention.unmasked_attention(q, k, v, scale, mask_kind == "is_causal")
    else:
        def attend():
            return attention.prefill_attention(q, k, v, mask, scale, False)
    out = attend()
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    ref = _reference(q, k, v, mask, scale).float()
    if ref.abs().sum() == 0:
        assert not out.any()
    else:
        assert sqnr(out, ref) >= (40 if dtype == torch.bfloat16 else 100)
    hidden = (mask == NEG_INF).all(-1, keepdim=True).expand(batch, heads, length, 1)
    assert not out.masked_select(hidden).any()  # a query that sees no key gets 0
    assert not _ran_aten_flash(attend)
