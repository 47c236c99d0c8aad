"""compile_ahead_of_time: a tiny Llama whose linears hold GGUF blocks, exported and compiled by
AOTInductor with zen's pass; logits against eager with the same blocks, step by step."""
import collections
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

import zen_inductor
from zen_inductor import aot_package, gguf_model, native

from conftest import sqnr

MAX_CACHE = 48


def tiny_gguf_llama(kind: str):
    """A random 2-layer Llama (fp32) whose linears are ``GGUFLinear``s on ``kind`` blocks made by
    the gguf package's own quantizer."""
    import gguf
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
                                   tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear):
            raw = gguf.quantize(module.weight.detach().numpy(), gguf.GGMLQuantizationType[kind])
            gguf_model._replace(model, name, gguf_model.GGUFLinear(kind, gguf_model._blocks(kind, raw)))
    return model


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    model = tiny_gguf_llama("Q4_1")
    generation_config = model.generation_config.to_dict()
    inductor_config = torch._inductor.config.get_config_copy()
    before = dict(zen_inductor.counters)
    folder = tmp_path_factory.mktemp("aot")
    generator = zen_inductor.compile_ahead_of_time(model, max_cache_len=MAX_CACHE, package_dir=str(folder))
    matched = {k: v - before.get(k, 0) for k, v in zen_inductor.counters.items() if v != before.get(k, 0)}
    return dict(model=model, generator=generator, matched=matched, folder=folder,
                generation_config=generation_config, inductor_config=inductor_config)


def _calls(folder) -> list:
    """The ops the program's wrapper calls through the dispatcher (AOTInductor's proxy executor)."""
    with zipfile.ZipFile(folder / aot_package.PROGRAM) as package:
        name = next(n for n in package.namelist() if n.endswith("wrapper.json"))
        return [call["node"] for call in json.loads(package.read(name))["nodes"]]


def test_one_program_runs_our_kernels_for_a_prompt_and_for_a_step(compiled):
    matched = compiled["matched"]
    # 7 linears a layer (q/k/v and gate/up merged) and the lm_head
    assert matched.get("dequant_matmul", 0) == 2 * 7 + 1
    assert matched.get("concat_linear", 0) == 2 * 2
    # swiglu fused: the dynamic length reads its size off the fused result
    assert matched.get("linear_epilogue", 0) == 2
    assert matched.get("prefill_attention", 0) == 2 and "decode_attention" not in matched
    calls = collections.Counter(node["target"] for node in _calls(compiled["folder"]))
    # a layer's 4 linears and its attention take one row in C++; the lm_head reads one row only
    assert calls == {"zen::quant_linear.by_rows": 2 * 4, "zen::prefill_attention.by_rows": 2, "zen::quant_linear.native": 1}
    with zipfile.ZipFile(compiled["folder"] / aot_package.PROGRAM) as package:
        wrapper = next(package.read(n).decode() for n in package.namelist() if n.endswith(".wrapper.cpp"))
    # replaced attention is gone from what runs, not only bypassed
    assert "scaled_dot_product_flash_attention" not in wrapper.split("run_impl", 1)[1]


def test_the_one_row_call_reads_the_plans_packing(compiled):
    """A linear's C++ call for one row takes the packed weight of its plan's M = 1 kernel: the same
    constants, not a second copy."""
    for node in _calls(compiled["folder"]):
        if node["target"] == "zen::quant_linear.by_rows":
            args = {a["name"]: a["arg"] for a in node["inputs"]}
            packed = {t["name"] for t in args["packed"]["as_tensors"]}
            assert {t["name"] for t in args["weight"]["as_tensors"]} <= packed


def test_logits_step_by_step_match_eager_with_the_same_blocks(compiled):
    model, generator = compiled["model"], compiled["generator"]
    prompt = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    out = generator.generate(prompt, max_new_tokens=8)
    assert out.shape == (1, 20) and torch.equal(out[:, :12], prompt)
    with torch.no_grad():
        reference = model(out).logits[0].float()
    # prefill (the last position's logits only), then one decode step a token
    got = [generator.logits(out[:, :12])[0]]
    for position in range(12, out.shape[1]):
        got.append(generator.logits(out[:, position:position + 1], start=position)[0])
    got = torch.cat(got)
    reference = reference[11:]
    assert got.shape == reference.shape
    assert sqnr(got, reference) >= 40
    # the tokens generate() chose are the argmax of the logits it computed
    assert torch.equal(got[:-1].argmax(-1), out[0, 12:])


def test_a_compile_leaves_the_users_settings(compiled):
    assert compiled["model"].generation_config.to_dict() == compiled["generation_config"]
    assert torch._inductor.config.get_config_copy() == compiled["inductor_config"]


def test_inputs_it_cannot_take_are_clear_errors(compiled):
    generator = compiled["generator"]
    with pytest.raises(ValueError, match="batch 1"):
        generator.logits(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="do not fit"):
        generator.logits(torch.zeros(1, MAX_CACHE + 1, dtype=torch.long))


_LOAD_ELSEWHERE = """
import sys, torch, zen_inductor
generator = zen_inductor.load_ahead_of_time(sys.argv[1])
prompt = torch.tensor([json.loads(sys.argv[2])])
print(json.dumps({"tokens": generator.generate(prompt, max_new_tokens=8)[0].tolist(),
                  "imported": [m for m in ("transformers", "torch._inductor", "zentorch") if m in sys.modules]}))
"""


def test_the_package_runs_in_another_process_without_the_models_code(compiled):
    prompt = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    expected = compiled["generator"].generate(prompt, max_new_tokens=8)[0].tolist()
    run = subprocess.run([sys.executable, "-c", "import json\n" + _LOAD_ELSEWHERE, str(compiled["folder"]),
                          json.dumps(prompt[0].tolist())], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["tokens"] == expected
    # the libraries come from the package: nothing is built, Inductor is not imported
    assert result["imported"] == []


def _package_copy(compiled, tmp_path, **manifest_changes):
    folder = tmp_path / "package"
    folder.mkdir()
    os.symlink(compiled["folder"] / aot_package.PROGRAM, folder / aot_package.PROGRAM)
    manifest = json.loads((compiled["folder"] / "generator.json").read_text())
    (folder / "generator.json").write_text(json.dumps({**manifest, **manifest_changes}))
    return str(folder)


def test_a_package_this_machine_cannot_run_is_a_clear_error(compiled, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a package"):
        zen_inductor.load_ahead_of_time(str(tmp_path))
    with pytest.raises(RuntimeError, match="this CPU lacks avx9000"):
        zen_inductor.load_ahead_of_time(_package_copy(compiled, tmp_path, inductor_arch_flags="-mavx2 -mavx9000"))
    shutil.rmtree(tmp_path / "package")
    with pytest.raises(RuntimeError, match="other kernels"):
        zen_inductor.load_ahead_of_time(_package_copy(compiled, tmp_path, zen_sources="0" * 16))
    shutil.rmtree(tmp_path / "package")
    with pytest.raises(RuntimeError, match="compiled with torch 1.0"):
        zen_inductor.load_ahead_of_time(_package_copy(compiled, tmp_path, torch="1.0.0"))


def test_code_is_checked_against_the_cpu_extensions_its_compiler_flags_allow():
    from torch._inductor.cpu_vec_isa import VecAMX, VecAVX2, VecAVX512, VecAVX512VNNI

    from zen_inductor.aot_package import extensions_of

    assert extensions_of(VecAVX2().build_arch_flags()) == {"avx2", "fma", "f16c"}
    assert extensions_of(VecAVX512().build_arch_flags()) == {"avx512f", "avx512dq", "avx512vl", "avx512bw", "fma"}
    assert extensions_of(VecAVX512VNNI().build_arch_flags()) == extensions_of(VecAVX512().build_arch_flags()) | {"avx512_vnni"}
    assert {"amx_tile", "amx_bf16", "amx_int8"} <= extensions_of(VecAMX().build_arch_flags())
    assert extensions_of("-mavx512bf16 -mavxvnni -O3") == {"avx512_bf16", "avx_vnni"}


def test_a_tied_q8_0_table_is_held_once_for_the_embedding_and_the_output_layer(tmp_path):
    """llama.cpp's layout of a tied model: the output layer computes from the token table's Q8_0
    blocks. Packed for zen_q8_0_rows, the output layer's weight is the table's bytes: the package
    holds one tensor for both."""
    import gguf

    model = tiny_gguf_llama("Q4_1")
    table = model.get_input_embeddings().weight.detach()
    blocks = gguf_model._blocks("Q8_0", gguf.quantize(table.numpy(), gguf.GGMLQuantizationType.Q8_0))
    gguf_model._replace(model, "model.embed_tokens", gguf_model.GGUFEmbedding("Q8_0", blocks, torch.float32))
    gguf_model._replace(model, "lm_head", gguf_model.GGUFLinear("Q8_0", blocks))
    allowed = ("zen_q8_0_rows", "zen_w4_avx2", "zen_w4_avx512", "int4_tiles_sgemm")  # the output layer: the rows kernel
    generator = zen_inductor.compile_ahead_of_time(model, max_cache_len=MAX_CACHE, package_dir=str(tmp_path),
                                                   options={"kernel_allow": allowed})
    assert "q8_0_rows" in json.loads((tmp_path / "generator.json").read_text())["native_entries"]
    prompt = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    out = generator.generate(prompt, max_new_tokens=6)
    with torch.no_grad():
        reference = model(out).logits[0, 11:-1].float()
    got = [generator.logits(out[:, :12])[0]] + [generator.logits(out[:, p:p + 1], start=p)[0] for p in range(12, out.shape[1] - 1)]
    assert sqnr(torch.cat(got), reference) >= 40
    weights = aot_package._weights(str(tmp_path / aot_package.PROGRAM), {}, skip=())
    tables = [t.untyped_storage().data_ptr() for t in weights.values() if t.shape == blocks.shape and t.dtype == torch.uint8]
    # the embedding's table and the output layer's packing: two constants, one tensor
    assert len(tables) == 2 and len(set(tables)) == 1
    run = subprocess.run([sys.executable, "-c", "import json\n" + _LOAD_ELSEWHERE, str(tmp_path), json.dumps(prompt[0].tolist())],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["imported"] == [] and result["tokens"] == generator.generate(prompt, max_new_tokens=8)[0].tolist()


def test_a_package_names_the_libraries_its_calls_need(tmp_path):
    """Read from the calls AOTInductor serialized: the kernels of each plan, and the swiglu library
    where a kernel of a swiglu linear's plan does not fuse it (its epilogue runs after)."""
    from zen_inductor.kernels import LinearSpec, Plan

    spec = LinearSpec(n=512, k=128, group_size=32, bits=4, symmetric=False, act_dtype=torch.float32, epilogue="swiglu")
    plan = Plan(spec, (4,), ("zen_w4_avx2", "int4_tiles_sgemm")).encode()
    call = {"node": {"target": "zen::quant_linear", "inputs": [{"name": "plan", "arg": {"as_string": plan}}]}}
    with zipfile.ZipFile(tmp_path / "p.pt2", "w") as package:
        package.writestr("p/data/aotinductor/model/x.wrapper.json", json.dumps({"nodes": [call]}))
    assert aot_package._zen_calls(str(tmp_path / "p.pt2")) == {"native": {"woq_avx2", "tiles_dequant", "swiglu_avx2"},
                                                               "zentorch": False}
    fused = Plan(spec, (4,), ("zen_w4_avx2", "zen_w4_avx2")).encode()
    call["node"]["inputs"][0]["arg"]["as_string"] = fused
    with zipfile.ZipFile(tmp_path / "q.pt2", "w") as package:
        package.writestr("q/data/aotinductor/model/x.wrapper.json", json.dumps({"nodes": [call]}))
    assert aot_package._zen_calls(str(tmp_path / "q.pt2"))["native"] == {"woq_avx2"}
    # one program for every length: a one-row linear's entry beside its plan's kernels, and the
    # attention's one position by decode attention, its prompt by our C++ where that builds
    by_rows = {"node": {"target": "zen::quant_linear.by_rows", "inputs": [
        {"name": "plan", "arg": {"as_string": fused}}, {"name": "entry", "arg": {"as_string": "q8_0_rows"}}]}}
    attention = {"node": {"target": "zen::prefill_attention.by_rows", "inputs": [{"name": "zentorch", "arg": {"as_bool": False}}]}}
    with zipfile.ZipFile(tmp_path / "r.pt2", "w") as package:
        package.writestr("r/data/aotinductor/model/x.wrapper.json", json.dumps({"nodes": [by_rows, attention]}))
    prompt = {"prefill_attention_avx2"} if native.unavailable("prefill_attention_avx2") is None else set()
    assert aot_package._zen_calls(str(tmp_path / "r.pt2")) == {
        "native": {"woq_avx2", "q8_0_rows", "decode_attention", *prompt}, "zentorch": False}
    # a kernel's helpers: _int_mm's x quantized and its sums scaled by our C++ where the package carries them
    int8 = LinearSpec(n=512, k=128, group_size=128, bits=8, symmetric=True, act_dtype=torch.bfloat16, dynamic_activation=True)
    call["node"]["inputs"][0]["arg"]["as_string"] = Plan(int8, (16,), ("zen_a8w8_rows_avx2", "aten_int_mm_da8")).encode()
    with zipfile.ZipFile(tmp_path / "s.pt2", "w") as package:
        package.writestr("s/data/aotinductor/model/x.wrapper.json", json.dumps({"nodes": [call]}))
    assert aot_package._zen_calls(str(tmp_path / "s.pt2"))["native"] == {"a8w8_rows_avx2", "int8_quantize_rows",
                                                                       "int8_rows_epilogue"}
