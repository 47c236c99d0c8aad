"""add_rmsnorm / rmsnorm: the forms in the wild, near misses, and the replacement mechanics."""
import torch

import zen_inductor
import zen_inductor.dumps
import zen_inductor.patterns.add_rmsnorm as add_rmsnorm
from zen_inductor.cpu import zentorch_unavailable

from conftest import compile_zen, sqnr

H = 64


class LlamaStyle(torch.nn.Module):
    """weight * y.to(dtype), after an fp32 upcast; residual kept for later."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(H, dtype=torch.bfloat16) + 0.5)

    def forward(self, x, branch):
        h = x + branch
        hf = h.to(torch.float32)
        y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)
        return h * 2, self.weight * y.to(torch.bfloat16)


class GemmaStyle(torch.nn.Module):
    """y * (1 + weight) in fp32, then the downcast; x * x instead of pow."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(H, dtype=torch.bfloat16) * 0.1)

    def forward(self, x):
        hf = x.float()
        y = hf * torch.rsqrt((hf * hf).mean(-1, keepdim=True) + 1e-6)
        return (y * (1.0 + self.weight.float())).type_as(x)


class NotANorm(torch.nn.Module):
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + 1e-6)


def _run(module, *inputs):
    with torch.no_grad():
        eager = module(*inputs)
        zen = compile_zen(module)(*inputs)
    eager = eager if isinstance(eager, tuple) else (eager,)
    zen = zen if isinstance(zen, tuple) else (zen,)
    for e, z in zip(eager, zen):
        assert sqnr(z, e) >= 35


def test_add_rmsnorm_llama_form():
    _run(LlamaStyle().eval(), torch.randn(2, 5, H, dtype=torch.bfloat16), torch.randn(2, 5, H, dtype=torch.bfloat16))
    assert zen_inductor.counters["add_rmsnorm.upcast_weight_last_3d"] == 1
    match = zen_inductor.last_report()["matches"][0]
    assert "test_norms.py" in match["source"]


def test_gemma_form_is_a_variant_not_a_copy():
    _run(GemmaStyle().eval(), torch.randn(3, 4, 2, H, dtype=torch.bfloat16))
    assert zen_inductor.counters["rmsnorm.upcast_weight_first_4d"] == 1


def test_reduction_over_another_dim_is_a_near_miss():
    _run(NotANorm().eval(), torch.randn(4, H))
    assert zen_inductor.counters["rmsnorm"] == 0
    (miss,) = zen_inductor.last_report()["near_misses"]
    assert "reduces the last dim" in miss["reason"]


def test_on_this_cpu_the_choice_and_its_reason_are_reported():
    inputs = torch.randn(3, H, dtype=torch.bfloat16), torch.randn(3, H, dtype=torch.bfloat16)
    _run(LlamaStyle().eval(), *inputs)
    entry = zen_inductor.last_report()["autotune"][0]
    assert entry["winner"] == "inductor"  # by default: it keeps the residual sum in fp32
    assert zentorch_unavailable() or "config.zentorch_add_rmsnorm" in entry["excluded"]["zentorch_add_rms_norm"]
    torch._dynamo.reset()
    with zen_inductor.config.patch(zentorch_add_rmsnorm=True):
        _run(LlamaStyle().eval(), *inputs)
    entry = zen_inductor.last_report()["autotune"][0]
    assert entry["winner"] in ("inductor", "zentorch_add_rms_norm")
    if entry["winner"] == "inductor":
        reason = entry["excluded"]["zentorch_add_rms_norm"]
        # the Llama form is the one zentorch computes: only its absence or a failed check stops it
        assert zentorch_unavailable() or "SQNR" in reason or "failed" in reason, reason


def test_replacement_keeps_both_outputs_right(monkeypatch, dumped):
    """The graph surgery of the fused path, with a reference body standing in for zentorch."""

    def reference(a, b, weight, eps):
        s = a + b
        sf = s.float()
        return s, (sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps)).to(a.dtype) * weight

    monkeypatch.setattr(add_rmsnorm, "ADD_RMS_NORM_IMPL", reference)
    monkeypatch.setattr(add_rmsnorm, "choose", lambda norm: ("zentorch_add_rms_norm", {}))
    _run(LlamaStyle().eval(), torch.randn(2, 5, H, dtype=torch.bfloat16), torch.randn(2, 5, H, dtype=torch.bfloat16))
    after = dumped("after.py")
    assert "torch.ops.zen.add_rms_norm.default" in after
    assert "rsqrt" not in after
