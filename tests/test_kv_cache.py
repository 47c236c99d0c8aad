"""zen_inductor.Int8StaticCache: int8 keys and values with a scale a KV head and position, used by
transformers' generate(), and read as codes by zen's decode attention; Bf16StaticCache: bf16 keys
and values beside an fp32 model, read as bf16."""
import pytest
import torch

import zen_inductor
from zen_inductor import attention
from zen_inductor.kv_cache import CODE_MAX, Bf16StaticCache, Int8StaticCache, dequantize, quantize

from conftest import compile_zen, sqnr

LAYERS = 2


def llama(dtype=torch.float32, **extra):
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=LAYERS, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256, max_position_embeddings=256,
                                   tie_word_embeddings=False, **extra)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def step_logits(forward, config, cache_cls, prompt, steps: int) -> torch.Tensor:
    """The logits of a prompt's last position and of ``steps`` greedy decode steps, [steps + 1, vocab],
    through a fresh cache of ``cache_cls`` called as generate() calls the model."""
    length = prompt.shape[1]
    cache = cache_cls(config=config, max_cache_len=length + steps + 4)
    logits = forward(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(length), use_cache=True,
                     logits_to_keep=1).logits[:, -1]
    rows = [logits]
    for i in range(steps):
        token = rows[-1].argmax(-1, keepdim=True)
        rows.append(forward(input_ids=token, past_key_values=cache, cache_position=torch.tensor([length + i]),
                            use_cache=True, logits_to_keep=1).logits[:, -1])
    return torch.cat(rows).float()


def test_quantize_rounds_each_row_to_its_own_scale():
    x = torch.randn(2, 3, 17, 64) * torch.logspace(-3, 2, 17)[:, None]  # rows a hundred thousand times apart
    x[0, 0, 0] = 0  # an all-zero row: a finite scale, codes 0
    codes, scales = quantize(x)
    assert codes.dtype == torch.int8 and scales.shape == (2, 3, 17, 1) and codes.abs().max() <= CODE_MAX
    err = (dequantize(codes, scales, torch.float32) - x).abs()
    assert (err <= scales / 2 * (1 + 1e-5)).all()  # half a step of the row's own scale
    assert not codes[0, 0, 0].any() and torch.isfinite(scales).all()


def test_the_cache_holds_codes_and_refuses_sliding_layers():
    model = llama()
    cache = Int8StaticCache(config=model.config, max_cache_len=32)
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 5)), past_key_values=cache, use_cache=True)
    layer = cache.layers[0]
    assert layer.keys.dtype == torch.int8 and layer.keys.shape == (1, 2, 32, 64) and layer.key_scales.shape == (1, 2, 32, 1)
    assert int(cache.get_seq_length()) == 5 and layer.key_scales[..., :5, :].gt(0).all() and not layer.keys[..., 5:, :].any()
    cache.reset()
    assert not layer.key_scales.any() and int(cache.get_seq_length()) == 0
    with pytest.raises(ValueError, match="sliding_attention"):
        Int8StaticCache(config=llama(sliding_window=8, layer_types=["sliding_attention", "full_attention"]).config,
                        max_cache_len=32)


def test_generate_with_the_int8_cache_stays_close_to_the_full_precision_cache():
    """Eager, the same model: logits of prefill and decode steps with int8 keys and values against
    the fp32 StaticCache's, and generate() accepts the cache."""
    from transformers import StaticCache

    model = llama()
    prompt = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = step_logits(model.forward, model.config, StaticCache, prompt, 6)
        int8 = step_logits(model.forward, model.config, Int8StaticCache, prompt, 6)
        out = model.generate(prompt, max_new_tokens=4, do_sample=False,
                             past_key_values=Int8StaticCache(config=model.config, max_cache_len=32))
    assert out.shape == (1, 28)
    assert sqnr(int8, full) >= 30
    print(f"int8 cache against the fp32 cache: {sqnr(int8, full):.1f} dB over 7 positions' logits")


def test_the_bf16_cache_holds_bf16_and_returns_the_models_dtype():
    """Eager: the layers keep bf16, update hands back fp32, and the logits stay within bf16's
    rounding of keys and values of the fp32 StaticCache's; generate() accepts the cache."""
    from transformers import StaticCache

    model = llama()
    prompt = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = step_logits(model.forward, model.config, StaticCache, prompt, 6)
        bf16 = step_logits(model.forward, model.config, Bf16StaticCache, prompt, 6)
        cache = Bf16StaticCache(config=model.config, max_cache_len=32)
        out = model.generate(prompt, max_new_tokens=4, do_sample=False, past_key_values=cache)
    assert out.shape == (1, 28)
    assert cache.layers[0].keys.dtype == torch.bfloat16 and cache.layers[0].keys[..., :27, :].abs().sum() > 0
    keys, _ = cache.layers[0].update(torch.zeros(1, 2, 1, 64), torch.zeros(1, 2, 1, 64))
    assert keys.dtype == torch.float32
    assert sqnr(bf16, full) >= 30
    print(f"bf16 cache against the fp32 cache: {sqnr(bf16, full):.1f} dB over 7 positions' logits")


@pytest.mark.skipif(attention.unavailable() is not None, reason="zen.decode_attention cannot be built here")
@pytest.mark.parametrize("cache_cls, dtype, stored, min_db", [
    (Int8StaticCache, torch.float32, "i8", 40), (Int8StaticCache, torch.bfloat16, "i8", 25),
    (Bf16StaticCache, torch.float32, "bf16", 40),
])
def test_zen_reads_the_narrow_cache_not_a_widened_copy(cache_cls, dtype, stored, min_db, dumped):
    """Compiled by zen, each decode step's attention is zen.decode_attention on what the cache
    stores (int8 codes and their scales; bf16 beside an fp32 model): no copy of a layer's cache in
    wider floats is made, and the logits are eager's on the same cache."""
    model = llama(dtype)
    prompt = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        eager = step_logits(model.forward, model.config, cache_cls, prompt, 4)
        zen = step_logits(compile_zen(model.forward), model.config, cache_cls, prompt, 4)
    variant = "int8" if cache_cls is Int8StaticCache else "bf16"
    assert zen_inductor.counters[f"decode_attention.gqa_masked_{variant}"] == LAYERS  # the decode graph's layers
    after = dumped("after.py")  # the last graph compiled: decode
    calls = [line for line in after.splitlines() if "zen.decode_attention" in line]
    assert len(calls) == LAYERS and "flash_attention" not in after
    wider = {"i8": ("f32", "bf16"), "bf16": ("f32",)}[stored]
    assert f"{stored}[1, 2, 32, 64]" in after and not any(f'{t}[1, 2, 32, 64]"' in after for t in wider)
    assert sqnr(zen, eager) >= min_db
