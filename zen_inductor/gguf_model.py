"""GGUF files as transformers models whose linears compute with the file's own codes and scales.

    model, tokenizer = zen_inductor.load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    fast = torch.compile(model, backend="zen")

The file is read with the ``gguf`` package (its reader memory-maps the tensors). Every 2-D weight
of a linear in a supported block format becomes a ``GGUFLinear`` that keeps the file's blocks
(its bytes as stored: float16 scales and minima, then the codes) and dequantizes them in ``forward``:

    Q4_0: W = d * (q - 8)       q: 4-bit, d per block of 32
    Q4_1: W = d * q + m         q: 4-bit, d and m per block of 32
    Q8_0: W = d * q             q: int8, d per block of 32

zen's ``dequant_matmul`` reads that chain at compile time and packs the same codes straight
into its kernels: nothing is requantized. Eager and stock Inductor run the same chain, so every
system computes with the same weights. The token embedding table stays in its blocks too (a
``GGUFEmbedding`` dequantizes the rows a lookup gathers); other tensors (norms) are dequantized
to the model's dtype, and so is a linear or table in a block format we do not take, with a
warning naming it. Llama's q and k rows are stored permuted for llama.cpp's rotary layout; the
permutation moves whole rows, so it is undone on the blocks.
"""
from __future__ import annotations

import contextlib
import logging
import os

import torch
import torch.nn.functional as F

log = logging.getLogger("zen_inductor")

BLOCK = 32  # weights per block of Q4_0, Q4_1 and Q8_0


def split_blocks(kind: str, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Views ``(qs, d, m)`` of blocks as the file stores them, ``[..., B, block bytes]`` of uint8:
    a block is its float16 scale d (and Q4_1's minimum m), then its codes."""
    codes = BLOCK if kind == "Q8_0" else BLOCK // 2
    d = blocks[..., 0:2].view(torch.float16).squeeze(-1)
    m = blocks[..., 2:4].view(torch.float16).squeeze(-1) if kind == "Q4_1" else None
    qs = blocks[..., blocks.shape[-1] - codes:]
    return (qs.view(torch.int8) if kind == "Q8_0" else qs), d, m


def q8_0_blocks(codes: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Q8_0 blocks ``[N, K/32, 34]`` as the file stores them (``split_blocks``'s inverse): int8
    codes [N, K] and their float16 scales d [N, K/32]."""
    n, blocks = d.shape
    out = torch.empty((n, blocks, 2 + BLOCK), dtype=torch.uint8)
    out[..., :2] = d.to(torch.float16).contiguous().view(torch.uint8).view(n, blocks, 2)
    out[..., 2:] = codes.contiguous().view(torch.uint8).view(n, blocks, BLOCK)
    return out


def element_codes(kind: str, qs: torch.Tensor) -> torch.Tensor:
    """The codes of ``split_blocks``'s ``qs`` one a weight, ``[..., B, 32]`` in element order: a Q4
    byte holds element j in its low nibble and j + 16 in its high one (unsigned, 0..15)."""
    return qs if kind == "Q8_0" else torch.cat([qs & 15, qs >> 4], dim=-1)


def dequantize_blocks(kind: str, blocks: torch.Tensor) -> torch.Tensor:
    """fp32 weights of blocks ``[..., B, block bytes]``: ``[..., B * 32]``."""
    qs, d, m = split_blocks(kind, blocks)
    w = element_codes(kind, qs).to(torch.float32)
    if kind == "Q4_0":
        w = w - 8
    w = w * d.to(torch.float32)[..., None]
    if kind == "Q4_1":
        w = w + m.to(torch.float32)[..., None]
    return w.flatten(-2)


@torch.library.custom_op("zen::gguf_dequantize", mutates_args=())
def gguf_dequantize(blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """``dequantize_blocks`` as one op of a traced graph (``dequantize_as_one_op``)."""
    return dequantize_blocks(kind, blocks)


@gguf_dequantize.register_fake
def _(blocks, kind):
    return blocks.new_empty((*blocks.shape[:-2], blocks.shape[-2] * BLOCK), dtype=torch.float32)


@contextlib.contextmanager
def dequantize_as_one_op(model: torch.nn.Module):
    """``model``'s ``GGUFLinear``s trace their dequantization as one ``zen::gguf_dequantize``
    node instead of the ~25 ops of ``dequantize_blocks``: SmolLM2's exported graph has 3168
    nodes instead of 7469, and every stage of a compile walks fewer (a non-strict export of its
    decode step took 4.4 s instead of 10.5). Only a compiler that reads the op (zen's ``dequant_matmul``, or its fold
    of whatever op it leaves) should see it: stock Inductor folds the aten chain but cannot look
    into a custom op."""
    linears = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    for module in linears:
        module.one_op = True
    try:
        yield
    finally:
        for module in linears:
            module.one_op = False


# One buffer a module, the file's bytes: Dynamo checks every tensor a compiled model reads at
# every call, and its check grew faster than the count (three tensors a linear cost SmolLM2's
# decode step ~0.3 ms more than one).
class GGUFLinear(torch.nn.Module):
    """``y = x @ W^T (+ bias)`` with W in one of GGUF's 32-weight block formats.

    Buffer: ``blocks`` [N, K/32, block bytes] of uint8, the file's blocks (``split_blocks``):
    Q4's codes are 16 bytes of two 4-bit codes, element j in the low nibble and j + 16 in the
    high one; Q8_0's 32 int8.
    """

    def __init__(self, kind: str, blocks: torch.Tensor, bias=None):
        super().__init__()
        self.kind = kind
        self.out_features, self.in_features = blocks.shape[0], blocks.shape[1] * BLOCK
        self.register_buffer("blocks", blocks)
        self.bias = bias
        self.one_op = False  # dequantize_as_one_op

    def weight_fp32(self) -> torch.Tensor:
        if self.one_op:
            return gguf_dequantize(self.blocks, self.kind)
        return dequantize_blocks(self.kind, self.blocks)

    def forward(self, x):
        w = self.weight_fp32()
        # no cast where x is fp32 already: export records even a no-op .to() as two nodes a linear
        return F.linear(x, w if w.dtype == x.dtype else w.to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"{self.kind}, in_features={self.in_features}, out_features={self.out_features}"


class GGUFEmbedding(torch.nn.Module):
    """A token embedding table kept in its GGUF blocks: a lookup dequantizes the rows it gathers.

    The table is the largest tensor of a small model (SmolLM2-135M: 49152 x 576, 108 MB in fp32
    against 29 MB of Q8_0 blocks), and a tied output layer computes from the same blocks, so
    both share one copy. Buffer as ``GGUFLinear``'s, a row a token.
    """

    def __init__(self, kind: str, blocks: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.kind, self.dtype = kind, dtype
        self.num_embeddings, self.embedding_dim = blocks.shape[0], blocks.shape[1] * BLOCK
        self.register_buffer("blocks", blocks)

    def forward(self, ids):
        return dequantize_blocks(self.kind, self.blocks[ids]).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.kind}, {self.num_embeddings}, {self.embedding_dim}"


def _blocks(kind: str, raw) -> torch.Tensor:
    """A tensor's bytes [N, K/32 * block bytes] in ``kind`` as [N, K/32, block bytes], copied out
    of the file's memory map."""
    import gguf
    import numpy as np

    size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][1]
    return torch.from_numpy(np.array(np.asarray(raw).view(np.uint8).reshape(raw.shape[0], -1, size)))


def _unpermute_rows(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's rotary permutation of q/k rows: per head it stores the rows of the two
    rotary halves interleaved (i, half) -> 2i + half; transformers keeps them as halves."""
    rows = t.shape[0]
    return t.reshape(heads, rows // heads // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


SUPPORTED = ("Q4_0", "Q4_1", "Q8_0")


def load_gguf(path: str, dtype: torch.dtype = torch.float32, quantized: bool = True):
    """``(model, tokenizer)`` of a GGUF file: a transformers causal LM whose linears in Q4_0, Q4_1
    or Q8_0 are ``GGUFLinear``s on the file's blocks, and whose token embedding table in one of
    them is a ``GGUFEmbedding`` on its blocks. Where the output layer is that table (tied),
    lm_head is a ``GGUFLinear`` on the same blocks, so the largest linear is quantized too and
    no float copy of the table exists (llama.cpp computes both from them). ``quantized=False``: every
    tensor dequantized to ``dtype``, plain ``nn.Linear``s (for torchao's formats, or a float twin).

    ``dtype`` is that of the activations and the unquantized tensors: fp32 by default, as llama.cpp
    computes. In bf16 SmolLM2-135M's answer to the demo's question flipped on its first token, a
    near tie in fp32 ("The" 25.33 against "L" 25.24), in stock Inductor and zen alike."""
    import gguf
    import transformers

    folder, name = os.path.split(os.path.abspath(path))
    config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    reader = gguf.GGUFReader(path)
    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == config.model_type), None)
    if arch is None:
        raise ValueError(f"{path}: architecture {config.model_type!r} is not one the gguf package names")
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    to_hf = {}
    for hf_name in model.state_dict():
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = names.get_name(base)
        if gguf_name is not None:
            to_hf[f"{gguf_name}.{suffix}"] = hf_name
    tied = getattr(config, "tie_word_embeddings", False)
    modules = dict(model.named_modules())
    state, untied = {}, False
    for tensor in reader.tensors:
        hf_name = to_hf.get(tensor.name)
        if hf_name is None:
            continue
        kind = tensor.tensor_type.name
        module_name, _, param = hf_name.rpartition(".")
        module = modules[module_name]
        is_table = isinstance(module, torch.nn.Embedding)
        heads = _rotary_heads(config, module_name)
        if quantized and param == "weight" and kind in SUPPORTED and (is_table or isinstance(module, torch.nn.Linear)):
            blocks = _blocks(kind, tensor.data)
            if heads:
                blocks = _unpermute_rows(blocks, heads)
            if is_table:
                _replace(model, module_name, GGUFEmbedding(kind, blocks, dtype))
                if tied:  # llama.cpp computes the output layer from the table's blocks too
                    _replace(model, "lm_head", GGUFLinear(kind, blocks))
                    untied = True
            else:
                _replace(model, module_name, GGUFLinear(kind, blocks, module.bias))
            continue
        if quantized and param == "weight" and (is_table or isinstance(module, torch.nn.Linear)):
            log.warning("zen_inductor: %s (%s) is in %s, which load_gguf does not keep quantized: "
                        "dequantized to %s", tensor.name, module_name, kind, dtype)
        values = torch.from_numpy(gguf.dequantize(tensor.data, tensor.tensor_type).copy())
        if heads:
            values = _unpermute_rows(values, heads)
        state[hf_name] = values.to(dtype)
    if untied:
        model.config.tie_word_embeddings = False
    model.load_state_dict(state, strict=False, assign=True)
    if tied and not untied:
        model.tie_weights()
    _materialize_rest(model)
    return model.eval(), tokenizer


def _replace(model, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _rotary_heads(config, module_name: str) -> int:
    """The head count whose rotary row permutation llama.cpp applied to this module's weight, or 0."""
    if config.model_type != "llama":
        return 0
    if module_name.endswith("self_attn.q_proj"):
        return config.num_attention_heads
    if module_name.endswith("self_attn.k_proj"):
        return config.num_key_value_heads
    return 0


def _materialize_rest(model) -> None:
    """Modules whose buffers the file does not hold (rotary embeddings: computed from the config)
    built again on the CPU, and a check that nothing stayed on the meta device."""
    for name, module in list(model.named_modules()):
        on_meta = any(b.device.type == "meta" for b in module.buffers(recurse=False))
        if on_meta and not list(module.parameters(recurse=False)) and hasattr(module, "config"):
            _replace(model, name, type(module)(module.config))
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise ValueError(f"the GGUF file holds no values for {', '.join(left[:5])}{' ...' if len(left) > 5 else ''}")


def requantize(source: str, target: str, kind: str) -> None:
    """Write ``source``'s model to ``target`` with its block-quantized 2-D weights in ``kind``
    (Q4_0, Q4_1 or Q8_0), by the ``gguf`` package: dequantized, then quantized by its reference
    quantizer. Metadata (tokenizer, chat template) is copied; other tensors are kept as stored."""
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    reader = gguf.GGUFReader(source)
    arch = str(reader.fields["general.architecture"].contents())
    writer = gguf.GGUFWriter(target, arch)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue  # written by the writer itself
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if field.name == "general.file_type":
            value = {"Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
                     "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]
        writer.add_key_value(field.name, value, value_type, sub_type=sub_type)
    for tensor in reader.tensors:  # quantized data goes in as its bytes, [rows, bytes a row]
        if tensor.tensor_type.name in SUPPORTED and len(tensor.shape) == 2:
            values = gguf.dequantize(tensor.data, tensor.tensor_type)
            writer.add_tensor(tensor.name, gguf.quantize(values, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

