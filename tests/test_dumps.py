"""Pattern-debug dumps: files per graph, report format, log summary, `python -m zen_inductor explain`."""
import json
import logging
import os
import subprocess
import sys

import expecttest
import torch

import zen_inductor
from zen_inductor import config
from zen_inductor.dumps import format_report

from conftest import any_rows, compile_zen
from quantized import GPTQPacked, HandDequant, K, N, quant_linear_calls


class TwoLinears(torch.nn.Module):
    """One linear zen can fuse, one it cannot (group size 48 fits no int4 kernel)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.good = HandDequant(64, True, 4)
        self.register_buffer("q48", torch.randint(-8, 8, (N, 240), dtype=torch.int8))
        self.register_buffer("s48", torch.rand(N, 5, 1, dtype=torch.bfloat16))

    def forward(self, x, x240):
        bad = (self.q48.view(N, 5, 48).to(torch.bfloat16) * self.s48).view(N, 240)
        return self.good(x), torch.nn.functional.linear(x240, bad)


def _compile_two(tmp_path):
    m = TwoLinears().eval()
    # without zentorch, the AVX-512 GEMV or the bf16 copy's GEMM (first in prefill bins with AMX),
    # so the choices and reasons read the same on every CPU
    with config.patch(debug_dir=str(tmp_path), autotune=False, use_zentorch=False,
                      kernel_deny=("dequant_gemm", "zen_w4_avx512", "aten_linear_dequantized")), torch.no_grad():
        compile_zen(m)(any_rows(torch.randn(3, K, dtype=torch.bfloat16)), any_rows(torch.randn(3, 240, dtype=torch.bfloat16)))
    return zen_inductor.last_report()


def _stable(report):
    """Report without file paths and line numbers, which move as the tests are edited."""
    report["graph"] = "graph_X"
    for item in report["matches"] + report["near_misses"]:
        item["source"] = item["source"].split(" (")[-1]
    return report


class TestDumps(expecttest.TestCase):
    def test_debug_dir_holds_graphs_and_report(self):
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            report = _compile_two(tmp)
            with open(os.path.join(tmp, "LATEST")) as f:
                folder = f.read().strip()
            files = sorted(os.listdir(folder))
            self.assertEqual(files, ["after.py", "before.py", "report.json"])
            with open(os.path.join(folder, "after.py")) as f:
                after = f.read()
            with open(os.path.join(folder, "before.py")) as f:
                before = f.read()
            with open(os.path.join(folder, "report.json")) as f:
                self.assertEqual(json.load(f)["matches"], report["matches"])
        # the fused kernel is in the dumped graph, the dequant chain it replaced is not
        self.assertEqual(len(quant_linear_calls(after)), 1)
        self.assertNotIn("quant_linear", before)
        # every node keeps the model line it came from
        self.assertIn("test_dumps.py", after)

    def test_report_format(self):
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            report = _stable(_compile_two(tmp))
        report.pop("autotune")
        self.assertExpectedInline(
            json.dumps(report, indent=1),
            """\
{
 "graph": "graph_X",
 "frozen": true,
 "matches": [
  {
   "pattern": "dequant_matmul",
   "variant": "int4_asym_group64",
   "source": "forward): return F.linear(x, self.weight(), self.bias)",
   "replacement": "zen.quant_linear",
   "kernels": {
    "1": "zen_w4_avx2",
    "2-4": "zen_w4_avx2",
    "5-16": "zen_w4_avx2",
    "17-64": "zen_w4_avx2",
    "65-256": "zen_w4_avx2",
    "257-1024": "int4_tiles_sgemm",
    "1025+": "int4_tiles_sgemm"
   }
  }
 ],
 "near_misses": [
  {
   "pattern": "dequant_matmul",
   "source": "forward): return self.good(x), torch.nn.functional.linear(x240, bad)",
   "reason": "no kernel keeps this int4_sym_group48 weight quantized (zentorch_woq_linear: zentorch disabled by config.use_zentorch=False; aten_int4pack_mm: group size 48 not in 32/64/128/256; aten_int8pack_mm: per-group scales (group size 48); kernel is per-channel only; zen_w4_avx2: group size 48 with K=240: the tile layout takes groups that are multiples of 64; zen_w4_avx512: in config.kernel_deny); left to Inductor"
  }
 ]
}""",
        )

    def test_explain_prints_tables(self):
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            _compile_two(tmp)
            out = subprocess.run(
                [sys.executable, "-m", "zen_inductor", "explain"], capture_output=True, text=True,
                env={**os.environ, "ZEN_INDUCTOR_DEBUG_DIR": tmp}, timeout=300,
            )
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("MATCHES", out.stdout)
        self.assertIn("int4_asym_group64", out.stdout)
        self.assertIn("group size 48", out.stdout)


def test_summary_is_logged(caplog, tmp_path):
    with caplog.at_level(logging.INFO, logger="zen_inductor"):
        _compile_two(tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.name == "zen_inductor"]
    assert any(line.startswith("zen: 1 dequant_matmul; 1 near misses (see ") for line in lines), lines


def test_autotune_dump_lists_every_candidate(tmp_path):
    m = GPTQPacked(64, True).eval()
    with config.patch(debug_dir=str(tmp_path)), torch.no_grad():
        compile_zen(m)(torch.randn(2, K, dtype=torch.bfloat16))
    entry = zen_inductor.last_report()["autotune"][0]
    assert any(b["times_us"] for b in entry["bins"])
    for b in entry["bins"]:
        timed = set(b["times_us"])
        # a bin with one candidate takes it untimed (the prefill bins where the AVX2 GEMV is pruned)
        assert b["winner"] in timed if timed else b["note"] == "static rule"
        # every kernel is accounted for: timed, failed verification, or never a candidate (with why)
        assert timed | set(b["excluded"]) | set(entry["excluded"]) >= {"aten_int4pack_mm", "dequant_gemm", "dequant_sgemm"}
    # what each bin cost the compile: timing several kernels takes longer than reusing a ranking
    assert all(b["seconds"] > 0 for b in entry["bins"] if b["times_us"])
    text = format_report(zen_inductor.last_report())
    assert "AUTOTUNE" in text and "winner" in text
    assert f"[{entry['bins'][0]['seconds']:.2f} s]" in text


def test_report_prints_choices_made_once_for_every_m():
    """add_rmsnorm's choice (zentorch's kernel or Inductor's) has no shape bins; `explain` printed
    reports of every Llama compiled on an AVX-512 machine through it, and failed on them."""
    report = {"graph": "g", "frozen": True, "matches": [], "near_misses": [], "autotune": [
        {"source": "modeling_llama.py:66 (forward)", "kind": "add_rmsnorm_upcast_weight_last_3d", "winner": "inductor",
         "excluded": {"zentorch_add_rms_norm": "zentorch multiplies the weight after the downcast only"}}]}
    text = format_report(report)
    assert "add_rmsnorm_upcast_weight_last_3d" in text and "winner inductor" in text
    assert "x zentorch_add_rms_norm: zentorch multiplies the weight after the downcast only" in text
