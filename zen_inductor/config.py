"""Flags of the zen backend, in the style of ``torch._inductor.config``.

Every flag can be set three ways, strongest last:
  * environment: ``ZEN_INDUCTOR_<FLAG>`` (read once, at import);
  * code: ``zen_inductor.config.autotune = False`` or ``with config.patch(autotune=False):``;
  * one compile: ``torch.compile(m, backend="zen", options={"autotune": False})``.
Options that are not zen flags are passed on to Inductor's own config.
"""
import os
import sys

from torch.utils._config_module import install_config_module


def _env(flag, default):
    # Parsed by the default's type so ZEN_INDUCTOR_AUTOTUNE_BUDGET_S=2.5 is a float, not a string.
    raw = os.environ.get("ZEN_INDUCTOR_" + flag.upper())
    if raw is None:
        return default
    if isinstance(default, bool):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    if isinstance(default, (list, tuple)):
        items = [s.strip() for s in raw.split(",") if s.strip()]
        if default and isinstance(default[0], int):
            items = [int(s) for s in items]
        return type(default)(items)
    return raw


# --- pattern families -------------------------------------------------------------------
# dequant -> matmul rewritten to a fused quantized linear (weight-only and dynamic-activation)
dequant_matmul: bool = _env("dequant_matmul", True)
# residual add feeding an RMSNorm, and standalone RMSNorm
add_rmsnorm: bool = _env("add_rmsnorm", True)
# let zentorch's add + RMSNorm op serve them (off: Inductor's kernel keeps the sum in fp32, more accurate)
zentorch_add_rmsnorm: bool = _env("zentorch_add_rmsnorm", False)
# linears sharing one input merged into one GEMM
concat_linear: bool = _env("concat_linear", True)
# unquantized bf16 linears dispatched per shape bin (bf16 GEMM or fp32 GEMM)
dense_matmul: bool = _env("dense_matmul", True)

# silu(gate) * up computed in the kernel of a merged gate/up linear
linear_epilogue: bool = _env("linear_epilogue", True)
# a residual add after a linear done by the linear's op, the stream carried in fp32 between layers
residual_add: bool = _env("residual_add", True)

# attention of one query position over the KV cache by our C++ kernel, or as two small GEMMs,
# instead of flash attention
decode_attention: bool = _env("decode_attention", True)
# attention over a prompt: under a mask, blocks of queries given only the keys they may see (by
# zentorch's kernel or ATen's); without one, by zentorch's SDPA kernel where it is ahead of ATen's
prefill_attention: bool = _env("prefill_attention", True)
# decode attention by our C++ kernel where it builds (AVX2 and a compiler), else the GEMMs
native_decode_attention: bool = _env("native_decode_attention", True)

# --- compilation ------------------------------------------------------------------------
# freeze weights into constants under torch.no_grad(); needed to prepack weights once
freezing: bool = _env("freezing", True)
# also run Inductor's own freezing after our pass (constant folding, oneDNN packing of the linears
# we left). Off: our pass has turned the weights it reads into constants already, and Inductor's
# freezing passes cost ~1.5 s a graph of a 4-layer 1B model in fake-tensor propagation alone
inductor_freezing: bool = _env("inductor_freezing", False)
# Inductor's checks, at every call, of the size, stride and alignment of each input and of each
# output of an op it does not generate: ~0.4 us each, ~10 a layer, 0.2 ms of a SmolLM2 decode step
# of 7. Dynamo's guards check the inputs already, and our ops' fake implementations are tested
# against their outputs (tests/test_op_contracts.py). On: the checks, to debug an op
runtime_size_asserts: bool = _env("runtime_size_asserts", False)

# --- kernel choice ----------------------------------------------------------------------
# time the candidate kernels per shape bin; False picks by each kernel's static rank (kernels/contract.py)
autotune: bool = _env("autotune", True)
# tune each shape bin at its first call (on the real input) instead of at compile time
autotune_lazy: bool = _env("autotune_lazy", False)
# upper bound of kernel timing per compiled graph, seconds (reading, packing and verifying weights
# are not counted: they happen without tuning too). A 1B model's linears (5 shapes x 7 bins) took
# ~25 s: with 20 the lm_head's bins were tuned by the next run, whose graph then changed and
# missed Inductor's FX graph cache once more.
autotune_budget_s: float = _env("autotune_budget_s", 30.0)
# timed repetitions per candidate and bin (the median is kept); 5 cost a cold 1B int4 compile
# 1.2 s more kernel timing (6.9 against 5.7 s) for the same choices where kernels are apart
autotune_reps: int = _env("autotune_reps", 3)
# upper edges of the M (token) bins; a last open bin covers everything above
shape_bin_edges: tuple = _env("shape_bin_edges", (1, 4, 16, 64, 256, 1024))
# kernel names that may be chosen (empty: all available)
kernel_allow: tuple = _env("kernel_allow", ())
# kernel names that must not be chosen
kernel_deny: tuple = _env("kernel_deny", ())
# leave out candidates that another available candidate beats by construction (the same
# arithmetic, slower: e.g. a bf16 GEMM on a CPU without native bf16); False verifies and times all
prune_dominated_kernels: bool = _env("prune_dominated_kernels", True)
# a plan keeps a second packed layout of a weight only where it is more than this factor faster
# in some bin; else the one kernel within it in every bin serves them all (one copy held)
layout_tolerance: float = _env("layout_tolerance", 1.1)
# use zentorch ops when zentorch imports and the CPU has the ISA it needs
use_zentorch: bool = _env("use_zentorch", True)
# use zen_inductor's own C++ kernels (built on first use with Inductor's C++ toolchain)
native_kernels: bool = _env("native_kernels", True)
# where a linear's rows are fixed when compiling (a decode step) and their kernel is one of our C++
# entries, the graph calls it directly (zen.quant_linear.native), with no Python dispatch between
native_direct_calls: bool = _env("native_direct_calls", True)
# Inductor's Python wrapper calls our C++ ops through one CPython function each (wrapper_calls.py)
# rather than torch.ops: the wrapper's time of a SmolLM2 decode step (151 calls) 1.34 -> 0.77 ms
fast_wrapper_calls: bool = _env("fast_wrapper_calls", True)
# let the prefill bins of a quantized linear choose a bf16 copy of its weight, dequantized once at
# compile time, for a vendor bf16 GEMM (zentorch on AVX512-BF16): held only while it wins a bin,
# at 2 bytes a weight. Measured on Zen 4 at M=128: zentorch's int4 GEMM ran ~180 GFLOP/s, its
# bf16 GEMM ~420 (Inductor's own recipe folds int4 weights to bf16 for the same reason)
dequantized_copies: bool = _env("dequantized_copies", True)
# a bf16 copy is made only where the machine keeps at least this fraction of its memory available
# after it and after the packings of the linears still to come: copies of every linear of an 8B
# int4 model are 16 GB, which with the model and its packings did not fit in 24 GB. The linears
# past the line keep their quantized kernels
memory_reserve: float = _env("memory_reserve", 0.25)
# copy packed weights to transparent huge pages (where the kernel offers them): decode reads every
# weight once per token, and on 4 KB pages address translation costs ~7% of it here
huge_page_weights: bool = _env("huge_page_weights", True)
# let kernels that quantize activations to int8 serve weight-only matches too (they must still
# reach the weight-only accuracy bar against the fp32 reference to be chosen)
int8_activations_for_weight_only: bool = _env("int8_activations_for_weight_only", False)
# where the model quantizes a linear's activations dynamically (torchao's int8, per row), run it
# only on kernels that quantize them the same way, for eager's numbers; otherwise kernels that
# compute with the activations as given compete too (closer to fp32: the report's "activations")
model_activation_quantization: bool = _env("model_activation_quantization", False)

# treat the CPU as having only these vector extensions, named as ATEN_CPU_CAPABILITY names them
# ("avx2", "default"; empty: all it has): a testing aid, see zen_inductor/cpu.py
cpu_capability: str = _env("cpu_capability", "")

# --- files ------------------------------------------------------------------------------
# persistent autotune cache
cache_dir: str = _env("cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "zen_inductor"))
# write per-graph pattern-debug dumps here when set
debug_dir: str = _env("debug_dir", "")

install_config_module(sys.modules[__name__])
