// aten_int_mm_da8's epilogue (kernels/int8_rows.py) in one pass: the int32 sums of
// torch._int_mm(x_int8, W^T) times x's row scale and W's column scale, plus the bias, and for a
// swiglu linear silu(gate) * up on gate's and up's sums, stored in bf16 or fp32. As ATen ops (a
// cast, two products, a sum, silu, a product and a cast, each a pass over an fp32 temporary) it
// took 62-67 ms of llama1b's gate/up at 2048 rows capped at AVX2, a fifth of the two GEMMs, where
// Inductor fuses stock's into one kernel (21 ms).
// Each output is (sum * x_scale) * w_scale + bias in fp32, the ATen ops' order, rounded once.
//
// sums and up: [M, N] int32, contiguous (up read only for swiglu); x_scale [M]; w_scale, w_scale_up,
// bias, bias_up read from column col0 on; out's row m starts at m * ld_out, and its columns
// col0 .. col0 + N are written: a merged q/k/v's parts are written side by side, a call each.
// N a multiple of 8.
#include "avx2_common.h"

using namespace zen_avx2;

namespace {

inline __m256 dequantized8(const int32_t* sums, __m256 x_scale, const float* w_scale, const float* bias, bool has_bias) {
  const __m256 s = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sums)));
  const __m256 y = _mm256_mul_ps(_mm256_mul_ps(s, x_scale), _mm256_loadu_ps(w_scale));
  return has_bias ? _mm256_add_ps(y, _mm256_loadu_ps(bias)) : y;
}

}  // namespace

extern "C" void kernel(const int32_t* sums, const int32_t* up, const float* x_scale, const float* w_scale,
                       const float* w_scale_up, const float* bias, const float* bias_up, void* out, int64_t M,
                       int64_t N, int64_t ld_out, int64_t col0, int64_t has_bias, int64_t swiglu, int64_t out_bf16) {
#pragma omp parallel for schedule(static)
  for (int64_t m = 0; m < M; ++m) {
    const __m256 xs = _mm256_set1_ps(x_scale[m]);
    for (int64_t n = 0; n < N; n += 8) {
      const int64_t c = col0 + n;
      __m256 y = dequantized8(sums + m * N + n, xs, w_scale + c, bias + c, has_bias);
      if (swiglu)
        y = _mm256_mul_ps(silu8(y), dequantized8(up + m * N + n, xs, w_scale_up + c, bias_up + c, has_bias));
      store8(out, m * ld_out + c, y, out_bf16);
    }
  }
}
