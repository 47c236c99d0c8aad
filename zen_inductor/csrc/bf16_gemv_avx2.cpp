// bf16 weights on a CPU without native bf16 (AVX2): y = x @ W^T (+ bias) for a few rows of x.
// W is the model's own row-major [N, K] bf16 tensor (no copy); a bf16 value is the top half of
// an fp32, so widening is a shift, and products and sums are fp32. Decode is memory-bound: the
// kernel streams 8 weight rows at a time; further rows of x find that block in cache.
#include "avx2_common.h"

namespace {

using namespace zen_avx2;

inline void store1(void* y, int64_t i, float v, bool bf16) {
  if (!bf16) {
    static_cast<float*>(y)[i] = v;
    return;
  }
  uint32_t u;
  __builtin_memcpy(&u, &v, 4);
  u += 0x7FFF + ((u >> 16) & 1);  // round to nearest even
  static_cast<uint16_t*>(y)[i] = static_cast<uint16_t>(u >> 16);
}

// The fp32 dot products of rows n0 .. n0 + ROWS_N - 1 of W with row m of x (fp32, [M, K]),
// plus the bias, in the first ROWS_N lanes.
template <int ROWS_N>
__m256 block(const uint16_t* w, const float* xf, const float* bias, int64_t m, int64_t n0, int64_t K) {
  __m256 acc[8];
  for (int j = 0; j < 8; ++j)
    acc[j] = _mm256_setzero_ps();
  const float* xr = xf + m * K;
  for (int64_t k = 0; k < K; k += 8) {
    const __m256 xv = _mm256_loadu_ps(xr + k);
    for (int j = 0; j < ROWS_N; ++j)
      acc[j] = _mm256_fmadd_ps(widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (n0 + j) * K + k))), xv, acc[j]);
  }
  const __m256 sums = reduce8(acc);
  return ROWS_N == 8 && bias ? _mm256_add_ps(sums, _mm256_loadu_ps(bias + n0)) : sums;
}

}  // namespace

extern "C" void kernel(const void* x, const uint16_t* w, const float* bias, void* y, int64_t M, int64_t N,
                       int64_t K, int64_t x_bf16, int64_t y_bf16, int64_t has_bias, int64_t swiglu) {
  static thread_local std::vector<float> xf;
  xf.resize(M * K);
  float* xfp = xf.data();
  const float* b = has_bias ? bias : nullptr;
  const int64_t out_blocks = swiglu ? N / 16 : (N + 7) / 8, n_out = swiglu ? N / 2 : N;
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < M * (K / 8); ++i)
      _mm256_storeu_ps(xfp + i * 8, load8(x, i * 8, x_bf16));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < out_blocks; ++t)
      for (int64_t m = 0; m < M; ++m) {
        if (swiglu) {  // rows of W: gate and up blocks of 8 in turn (see emit_tile)
          const __m256 g = block<8>(w, xfp, b, m, 16 * t, K), u = block<8>(w, xfp, b, m, 16 * t + 8, K);
          store8(y, m * n_out + 8 * t, _mm256_mul_ps(silu8(g), u), y_bf16);
        } else if (t * 8 + 8 <= N) {
          store8(y, m * N + 8 * t, block<8>(w, xfp, b, m, 8 * t, K), y_bf16);
        } else {  // the last rows of W when N is not a multiple of 8
          for (int64_t n = t * 8; n < N; ++n)
            store1(y, m * N + n, _mm256_cvtss_f32(block<1>(w, xfp, b, m, n, K)) + (b ? b[n] : 0.0f), y_bf16);
        }
      }
  }
}
