"""Candidate kernels for quantized and dense linears, and the op the compiled graph calls.

Where things are:
  weights.py       QuantWeight, DenseWeight, LinearSpec: what a kernel is given
  epilogues.py     swiglu, fused by some kernels, applied after the others
  contract.py      Kernel: what a kernel declares (accepts, packs, runs, layout, rank, ...)
  registry.py      KERNELS (every family's table) and candidates(spec)
  op.py            zen::quant_linear, its plan and per-bin dispatch
  families, one table each:
    aten_ops.py      ATen's int4pack and int8pack GEMMs, its bf16 GEMM on a copy
    int8_rows.py     int8 x int8 on the model's own int8 rows: ATen's _int_mm and our C++ GEMV
    zentorch_ops.py  zentorch's GEMMs (AVX-512 only)
    tiles.py         our C++ kernels on packed quantized tiles (csrc/)
    gguf_blocks.py   our C++ kernel on GGUF's Q8_0 blocks as the file stores them
    dense.py         bf16 weights: GEMMs and our C++ GEMVs
    dequantize.py    dequantize per call, then a GEMM
  native_entry.py  how our C++ linear entries are called (NativeLinear, zen::quant_linear.native, .by_rows)

A new kernel goes in its family's table (or a new family module added to registry's list).
Pattern code never names a kernel or a vendor.
"""
from .contract import Kernel, Unsuited, run_kernel
from .epilogues import SWIGLU_BLOCK, apply_epilogue, epilogue_reference, swiglu_row_order
from .native_entry import NativeLinear
from .op import LAZY, Plan, linear_by_rows, native_linear, on_lazy_choice, quant_linear
from .registry import KERNELS, candidates
from .weights import DenseWeight, LinearSpec, QuantWeight, fp32_row_blocks

__all__ = [
    "DenseWeight", "KERNELS", "Kernel", "LAZY", "LinearSpec", "NativeLinear", "Plan", "QuantWeight", "SWIGLU_BLOCK", "Unsuited", "apply_epilogue",
    "candidates", "epilogue_reference", "fp32_row_blocks", "linear_by_rows", "native_linear", "on_lazy_choice", "quant_linear", "run_kernel", "swiglu_row_order",
]
