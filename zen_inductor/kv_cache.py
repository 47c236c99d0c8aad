"""Static KV caches narrower than the model for transformers' ``generate()``, for decode to read
fewer bytes at long contexts: int8 (``Int8StaticCache``: half the bytes of a bf16 cache, a quarter
of fp32's), and bf16 beside an fp32 model (``Bf16StaticCache``, at the end).

    cache = zen_inductor.Int8StaticCache(config=model.config, max_cache_len=prompt + new)
    model.generate(**inputs, past_key_values=cache, max_new_tokens=new)

Each layer keeps its keys and values as int8 codes, [B, Hkv, max_cache_len, D], with one fp32
scale a (batch, KV head, position): symmetric, scale = max |x| / 127 over the head's D values, so
a new token is quantized alone as it arrives (a static cache is written a position at a time) and
an outlier in one token's head costs precision in that row only. 4 bytes of scale per D codes:
1.06 bytes a value at D = 64.

``update`` returns the whole cache dequantized to the model's dtype, so eager, stock Inductor and
any attention implementation compute with it unchanged. Under ``torch.compile(backend="zen")`` the
decode attention pattern sees that dequantization and hands ``zen.decode_attention`` the codes and
scales themselves (patterns/decode_attention.py), which read 1 byte a value.

Only full-attention layers (sliding-window caches keep their own layout): a model with others is
refused at construction.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, StaticLayer, get_layer_types_and_kwargs
from transformers.utils import is_torchdynamo_compiling

CODE_MAX = 127


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] as int8 codes [..., D] and fp32 scales [..., 1]: x ~ codes * scales."""
    x32 = x.float()
    scales = (x32.abs().amax(-1, keepdim=True) / CODE_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    codes = torch.round(x32 / scales).clamp(-CODE_MAX, CODE_MAX).to(torch.int8)
    return codes, scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The values int8 ``codes`` with their ``scales`` stand for, in ``dtype`` (the form the decode
    attention pattern recognizes: codes to fp32, times the scales, to ``dtype``)."""
    return (codes.to(torch.float32) * scales).to(dtype)


class Int8StaticLayer(StaticLayer):
    """A StaticLayer whose ``keys`` and ``values`` are int8 codes, with ``key_scales`` and
    ``value_scales`` (fp32, [B, Hkv, max_cache_len, 1]) beside them."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)  # dtype, sizes, the device
        b, heads, length = self.batch_size, self.num_heads, self.max_cache_len
        self.keys = torch.zeros(b, heads, length, self.k_head_dim, dtype=torch.int8, device=self.device)
        self.values = torch.zeros(b, heads, length, self.v_head_dim, dtype=torch.int8, device=self.device)
        self.key_scales = torch.zeros(b, heads, length, 1, dtype=torch.float32, device=self.device)
        self.value_scales = torch.zeros(b, heads, length, 1, dtype=torch.float32, device=self.device)
        if not is_torchdynamo_compiling():  # fixed addresses, as StaticLayer's own buffers
            for t in (self.keys, self.values, self.key_scales, self.value_scales):
                torch._dynamo.mark_static_address(t)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        positions = torch.arange(key_states.shape[-2], device=self.device) + self.cumulative_length
        self.cumulative_length.add_(key_states.shape[-2])
        key_codes, key_scales = quantize(key_states)
        value_codes, value_scales = quantize(value_states)
        self.keys.index_copy_(2, positions, key_codes)
        self.key_scales.index_copy_(2, positions, key_scales)
        self.values.index_copy_(2, positions, value_codes)
        self.value_scales.index_copy_(2, positions, value_scales)
        return (dequantize(self.keys, self.key_scales, self.dtype),
                dequantize(self.values, self.value_scales, self.dtype))

    def reset(self) -> None:
        super().reset()
        if self.is_initialized:
            self.key_scales.zero_()
            self.value_scales.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.get_seq_length() > 0:
            beam_idx = beam_idx.to(self.device)
            for name in ("keys", "values", "key_scales", "value_scales"):
                setattr(self, name, getattr(self, name).index_select(0, beam_idx))


class Int8StaticCache(Cache):
    """transformers' StaticCache with int8 keys and values (``Int8StaticLayer``), one layer per
    decoder layer of ``config``; pass it as ``past_key_values``."""

    def __init__(self, config, max_cache_len: int, **kwargs):
        layers = _full_attention_layers(config, type(self).__name__)
        super().__init__(layers=[Int8StaticLayer(max_cache_len=max_cache_len) for _ in layers])


class Bf16StaticLayer(StaticLayer):
    """A StaticLayer whose ``keys`` and ``values`` are bf16 whatever the model computes in;
    ``update`` returns them widened to the model's dtype."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states.to(torch.bfloat16), value_states.to(torch.bfloat16))
        self.dtype = key_states.dtype  # what update returns

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = super().update(key_states.to(torch.bfloat16), value_states.to(torch.bfloat16))
        return keys.to(self.dtype), values.to(self.dtype)


class Bf16StaticCache(Cache):
    """transformers' StaticCache with bf16 keys and values (``Bf16StaticLayer``) for a model that
    computes in fp32 (``load_gguf``'s default): half the bytes of its own cache, as llama.cpp keeps
    an f16 cache beside fp32 arithmetic. Under ``torch.compile(backend="zen")`` decode attention
    reads the bf16 cache itself (patterns/decode_attention.py), not the widened copy ``update``
    returns. For a bf16 model it is transformers' StaticCache."""

    def __init__(self, config, max_cache_len: int, **kwargs):
        layers = _full_attention_layers(config, type(self).__name__)
        super().__init__(layers=[Bf16StaticLayer(max_cache_len=max_cache_len) for _ in layers])


def _full_attention_layers(config, cache: str) -> list:
    """The decoder's layer types, all full attention (sliding-window layers keep their own layout)."""
    layer_types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    others = sorted(set(layer_types) - {"full_attention"})
    if others:
        raise ValueError(f"{cache} holds full-attention layers only; this model has {', '.join(others)} layers")
    return layer_types
