// silu(gate) * up on the output of a merged gate/up GEMM that does not fuse it (zentorch's):
// y is [M, 2 * n_out], gate and up in blocks of 8 columns in turn (kernels.swiglu_row_order);
// out is [M, n_out]. In fp32, rounded once, as the GEMV kernels' fused epilogue computes it.
// One pass over y: ATen needed four (two strided upcasts, silu, mul) and a downcast, ~2 ms at
// M=128, n_out=8192 on two Zen 4 cores.
#include "avx2_common.h"

using namespace zen_avx2;

extern "C" void kernel(const void* y, void* out, int64_t M, int64_t n_out, int64_t y_bf16, int64_t out_bf16) {
  const int64_t blocks = n_out / 8;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < M * blocks; ++i) {
    const int64_t m = i / blocks, t = i % blocks, row = m * 2 * n_out;
    const __m256 g = load8(y, row + 16 * t, y_bf16), u = load8(y, row + 16 * t + 8, y_bf16);
    store8(out, m * n_out + 8 * t, _mm256_mul_ps(silu8(g), u), out_bf16);
  }
}
