"""prefill_attention: attention over a prompt by zentorch_sdpa instead of ATen's flash attention."""
import pytest
import torch
import torch.nn.functional as F

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
    """zentorch_sdpa where it is ahead; ATen's flash attention, with the reason, where zentorch
    cannot run or the CPU runs bf16 attention on AMX."""
    fast = compile_zen(CausalAttend())
    with torch.no_grad():
        for length in (5, 37, 128):  # one graph: the prompt length is dynamic
            q, k, v = _qkv(length, dtype=dtype)
            ref = _fp32(q, k, v)
            # fp32 eager is the reference itself (inf dB): 100 dB is as close as a kernel must be
            assert sqnr(fast(q, k, v), ref) >= min(sqnr(CausalAttend()(q, k, v), ref), 100) - 0.5, length
    unavailable = zentorch_unavailable() or (AMX_REASON if dtype == torch.bfloat16 and amx_bf16() else None)
    if unavailable:  # the flash attention stays, and the dump says why
        (miss,) = zen_inductor.last_report()["near_misses"]
        assert unavailable in miss["reason"] and "flash_attention" in dumped("after.py")
        assert zen_inductor.counters["prefill_attention.near_miss"] == 1  # one compile for the three lengths
    else:
        assert zen_inductor.counters["prefill_attention.gqa"] == 1  # one compile for the three lengths
        after = dumped("after.py")
        assert "zentorch.zentorch_sdpa" in after and "flash_attention" not in after


@pytest.mark.parametrize("why", ["fp16", "zentorch off"])
def test_prefill_attention_near_misses_stay_correct(why):
    dtype = torch.float16 if why == "fp16" else torch.bfloat16
    q, k, v = _qkv(24, dtype=dtype)
    with torch.no_grad(), config.patch(use_zentorch=why != "zentorch off"):
        out = compile_zen(CausalAttend())(q, k, v)
    ref = _fp32(q, k, v)
    assert sqnr(out, ref) >= sqnr(CausalAttend()(q, k, v), ref) - 0.5
    assert zen_inductor.counters["prefill_attention"] == 0
    (miss,) = zen_inductor.last_report()["near_misses"]
    assert miss["pattern"] == "prefill_attention"
    # the first reason given: without zentorch's ISA (an AVX2 CPU) that one, before the dtype
    expected = "zentorch disabled" if why == "zentorch off" else zentorch_unavailable() or "float16"
    assert expected in miss["reason"]
