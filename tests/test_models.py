"""Whole transformers models (tiny configs, random weights): counts, logits accuracy, generate()."""
import copy

import pytest
import torch

import zen_inductor
from zen_inductor.attention import native_prefill_unavailable
from zen_inductor.cpu import amx_bf16, zentorch_unavailable

from conftest import compile_zen, compiled_graphs, reports_since, sqnr

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),  # q/k/v with bias
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),  # per-head q/k RMSNorm
}
LAYERS = 2


def build(family: str):
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    cfg = getattr(transformers, config_cls)(
        hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False, **extra,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(cfg).to(torch.bfloat16).eval()


def int4(model):
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    # decoder linears only; lm_head stays bf16 as in the demo
    from torchao.quantization import quantize_

    cfg = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64))
    cfg.set_inductor_config = False
    quantize_(model, cfg, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "lm_head" not in fqn)
    return model


def fp32_twin(model):
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, torch.nn.Linear) and type(module.weight) is not torch.nn.Parameter:
            module.weight = torch.nn.Parameter(module.weight.dequantize().detach(), requires_grad=False)
    # nn.Module.to, not the transformers override that refuses quantized models
    return torch.nn.Module.to(twin, torch.float32)


def model_and_reference(family: str, fmt: str):
    """(model in ``fmt``, a prompt of 16 tokens, the fp32 twin's logits on it)."""
    model = build(family)
    if fmt == "int4":
        int4(model)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model, ids, fp32_twin(model)(ids).logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("fmt", ["bf16", "int4"])
def test_model_counts_and_logits(family, fmt):
    model, ids, reference = model_and_reference(family, fmt)
    with torch.no_grad():
        eager = model(ids).logits
        zen = compile_zen(model)(ids).logits
    counts = zen_inductor.counters
    assert counts["concat_linear"] == 2 * LAYERS  # q/k/v and gate/up in every layer
    assert counts["linear_epilogue.swiglu"] == LAYERS  # silu(gate) * up inside the gate/up kernel
    if fmt == "int4":
        assert counts["dequant_matmul"] == 7 * LAYERS
        assert counts["concat_linear.3way_wo_int4_g64_sym_bfloat16"] == LAYERS
        assert counts["concat_linear.2way_wo_int4_g64_sym_bfloat16"] == LAYERS
        assert counts["dense_matmul"] == 1  # the bf16 lm_head
    else:
        assert counts["dequant_matmul"] == 0
        assert counts["dense_matmul"] == 4 * LAYERS + 1  # qkv, o, gate_up, down per layer; lm_head
    # both residual adds of every layer are done by the o_proj and down_proj linears, the stream
    # in fp32; so the norms read it without an add: two per layer and the final one. Qwen3 adds
    # per-head q/k norms (4-D) per layer.
    assert counts["residual_add"] == 2 * LAYERS
    assert counts["add_rmsnorm"] == 0
    assert counts["rmsnorm"] == 2 * LAYERS + 1 + (2 * LAYERS if family == "qwen3" else 0)
    if family == "qwen3":
        assert counts["rmsnorm.upcast_weight_last_4d"] == 2 * LAYERS
    # the prompt's attention (bf16): zentorch's SDPA kernel where zentorch runs and the CPU has no
    # AMX, else ours in C++ (an AVX2 CPU), else (AMX: ATen's runs on it) a near miss saying why
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    zentorch_missing = amx_bf16() or (zentorch_unavailable() and native_prefill_unavailable(torch.bfloat16, head_dim))
    assert counts["prefill_attention"] == (0 if zentorch_missing else LAYERS)
    report = zen_inductor.last_report()
    # sources name the model's code (its modeling file, or transformers' SDPA integration), not torch's
    assert all(m["source"].startswith("transformers/") for m in report["matches"]), report["matches"]
    assert [n["pattern"] for n in report["near_misses"]] == (["prefill_attention"] * LAYERS if zentorch_missing else [])
    # no less accurate than eager against the fp32 model with the same (dequantized) weights
    assert sqnr(zen, reference) >= sqnr(eager, reference) - 0.5


def test_generate_end_to_end():
    model = int4(build("llama"))
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = model.generate(ids, max_new_tokens=6, do_sample=False)
        model.forward = compile_zen(model.forward)
        zen = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert zen.shape == eager.shape
    assert zen_inductor.counters["dequant_matmul"] >= 7 * LAYERS
    assert zen_inductor.counters["decode_attention.gqa"] >= LAYERS  # the decode graphs' attention
    # greedy tokens of random-weight models may flip on near-ties; report, do not assert equality
    print("generate: tokens equal to eager:", bool(torch.equal(zen, eager)))


def test_generate_with_a_static_cache_keeps_decode_attention():
    """transformers passes a mask with every StaticCache: decode attention takes it (it stepped
    aside on any mask before, so real generation never used it)."""
    model = int4(build("llama"))
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(3))
    compiles_before = compiled_graphs()
    with torch.no_grad():
        eager = model.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static")
        model.forward = compile_zen(model.forward)
        zen = model.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert zen.shape == eager.shape
    # transformers repeats K and V over the query heads when it passes a mask: the pattern reads
    # the cache through that copy, per KV head ("gqa", not "mha")
    assert zen_inductor.counters["decode_attention.gqa_masked"] >= LAYERS
    reports = reports_since(compiles_before)
    assert not [m for r in reports for m in r["near_misses"] if m["pattern"] == "decode_attention"]
    print("static-cache generate: tokens equal to eager:", bool(torch.equal(zen, eager)))


def test_hugging_face_torchao_config(tmp_path):
    """A checkpoint loaded the Hugging Face way, from_pretrained(quantization_config=TorchAoConfig)."""
    import transformers
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    build("llama").save_pretrained(tmp_path)  # a local checkpoint: nothing comes from a hub
    cfg = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64))
    cfg.set_inductor_config = False
    model = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path, dtype=torch.bfloat16,
        quantization_config=transformers.TorchAoConfig(quant_type=cfg, modules_to_not_convert=["lm_head"]),
    ).eval()
    assert type(model.model.layers[0].mlp.up_proj.weight) is not torch.nn.Parameter  # really quantized
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = fp32_twin(model)(ids).logits
        eager = model(ids).logits
        zen = compile_zen(model)(ids).logits
    assert zen_inductor.counters["dequant_matmul"] == 7 * LAYERS
    assert zen_inductor.counters["concat_linear"] == 2 * LAYERS
    assert sqnr(zen, reference) >= sqnr(eager, reference) - 0.5


def test_a_padded_batch_decodes_each_row_as_if_alone():
    """Prompts of two lengths, left-padded into one batch with its attention mask, through a
    StaticCache: zen's prefill and decode attention take the padding mask, the steps' logits are
    as accurate as eager's against the fp32 twin, and the padded row's against its prompt's alone."""
    from transformers import StaticCache

    from zen_inductor.demo import generate, left_padded

    model = int4(build("llama"))
    twin = fp32_twin(model)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 256, (12,), generator=g), torch.randint(1, 256, (7,), generator=g)]
    ids, mask = left_padded(prompts)
    new = 5

    def static_cache(m):
        return lambda: StaticCache(config=m.config, max_cache_len=ids.shape[1] + new)

    def teacher_forced(forward, fed):
        """``forward`` given zen's tokens at each step (its own may flip on near ties); its logits."""
        logits, steps = [], iter(fed)

        def run(**kw):
            out = forward(**dict(kw, input_ids=next(steps)))
            logits.append(out.logits.float())
            return out
        return run, logits

    compiles_before = compiled_graphs()
    fast, zen_fed, zen_logits = compile_zen(model.forward), [], []

    def zen_forward(**kw):
        zen_fed.append(kw["input_ids"])
        out = fast(**kw)
        zen_logits.append(out.logits.float())
        return out
    with torch.no_grad():
        generate(zen_forward, ids, new, static_cache(model), attention_mask=mask)
        eager_run, eager_logits = teacher_forced(model.forward, zen_fed)
        generate(eager_run, ids, new, static_cache(model), attention_mask=mask)
        twin_run, twin_logits = teacher_forced(twin.forward, zen_fed)
        generate(twin_run, ids, new, static_cache(twin), attention_mask=mask)
        # the short prompt alone, unpadded, fed the tokens zen chose for its row
        alone_fed = [ids[1:, ids.shape[1] - len(prompts[1]):]] + [t[1:] for t in zen_fed[1:]]
        alone_run, alone_logits = teacher_forced(twin.forward, alone_fed)
        generate(alone_run, alone_fed[0], new, static_cache(twin))
    # Each step's kernels are timed, so which of two equally accurate kernels serves a bin (and
    # where bf16 rounds) varies between runs: one step of one row moves ~1 dB with it. All steps
    # together are held to eager's accuracy; each step is held within 2 dB of it, where padding
    # that leaked into a row would cost it tens.
    steps = list(zip(zen_logits, eager_logits, twin_logits, alone_logits))
    for step, (z, e, r, a) in enumerate(steps):
        assert sqnr(z, r) >= sqnr(e, r) - 2.0, step
        assert sqnr(z[1], a[0]) >= sqnr(e[1], a[0]) - 2.0, step  # the padding hidden as eager hides it
    z, e, r, a = (torch.stack(t) for t in zip(*steps))
    assert sqnr(z, r) >= sqnr(e, r) - 0.5
    assert sqnr(z[:, 1], a[:, 0]) >= sqnr(e[:, 1], a[:, 0]) - 0.5
    assert len(zen_logits) == new
    reports = reports_since(compiles_before)
    assert zen_inductor.counters["decode_attention.gqa_masked"] >= LAYERS
    assert not [m for r in reports for m in r["near_misses"] if m["pattern"] == "decode_attention"]
