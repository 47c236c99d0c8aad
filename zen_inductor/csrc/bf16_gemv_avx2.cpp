// bf16 weights on a CPU without native bf16 (AVX2): y = x @ W^T (+ bias) for a few rows of x.
// A bf16 value is the top half of an fp32, so widening is a shift; products and sums are fp32.
// Decode is memory-bound, so how W is laid out decides the speed; the kernel reads either
//   rows:   the model's own row-major [N, K] tensor (no copy): 8 rows are 8 streams, which keeps
//           many reads in flight when rows are long (31.8 GB/s at K = 8192 here), but short rows
//           (2 KB at K = 1024) end before the hardware prefetcher has ramped up (17 GB/s);
//   blocks: [ceil(N/8), K/8, 8, 8] (rows past N are zeros), 8 rows as one contiguous stream:
//           22.8 GB/s at K = 1024, 24 GB/s at K = 8192.
// Both are candidates; the autotuner picks per shape. Further rows of x find the block in cache.
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

// The fp32 dot products of rows n0 .. n0 + ROWS - 1 of W with row m of x (fp32, [M, K]) in the
// first ROWS lanes (n0 a multiple of 8 for blocks, which always come 8 rows at a time).
template <bool BLOCKS, int ROWS>
__m256 block(const uint16_t* w, const float* xf, int64_t m, int64_t n0, int64_t K) {
  __m256 acc[8];
  for (int j = 0; j < 8; ++j)
    acc[j] = _mm256_setzero_ps();
  const float* xr = xf + m * K;
  for (int64_t k = 0; k < K; k += 8) {
    const __m256 xv = _mm256_loadu_ps(xr + k);
    if (BLOCKS)  // the 2 KB ahead: one stream, so help the prefetcher keep reads in flight
      _mm_prefetch(reinterpret_cast<const char*>(w + n0 * K + k * 8) + 2048, _MM_HINT_T0);
    for (int j = 0; j < ROWS; ++j) {
      const uint16_t* wj = BLOCKS ? w + n0 * K + k * 8 + j * 8 : w + (n0 + j) * K + k;
      acc[j] = _mm256_fmadd_ps(widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wj))), xv, acc[j]);
    }
  }
  return reduce8(acc);
}

template <bool BLOCKS>
void gemv(const float* xf, const uint16_t* w, const float* b, void* y, int64_t M, int64_t N, int64_t K, bool y_bf16,
          bool swiglu, const float* res) {
  const int64_t out_blocks = swiglu ? N / 16 : (N + 7) / 8, n_out = swiglu ? N / 2 : N;
#pragma omp for schedule(static)
  for (int64_t t = 0; t < out_blocks; ++t)
    for (int64_t m = 0; m < M; ++m) {
      if (swiglu) {  // rows of W: gate and up blocks of 8 in turn (see emit_tile)
        __m256 g = block<BLOCKS, 8>(w, xf, m, 16 * t, K), u = block<BLOCKS, 8>(w, xf, m, 16 * t + 8, K);
        if (b) {
          g = _mm256_add_ps(g, _mm256_loadu_ps(b + 16 * t));
          u = _mm256_add_ps(u, _mm256_loadu_ps(b + 16 * t + 8));
        }
        store8(y, m * n_out + 8 * t, _mm256_mul_ps(silu8(g), u), y_bf16);
      } else if (t * 8 + 8 <= N) {
        __m256 s = block<BLOCKS, 8>(w, xf, m, 8 * t, K);
        if (b)
          s = _mm256_add_ps(s, _mm256_loadu_ps(b + 8 * t));
        if (res)  // fp32 [M, N], y then fp32: see emit_tile
          s = _mm256_add_ps(s, _mm256_loadu_ps(res + m * N + 8 * t));
        store8(y, m * N + 8 * t, s, y_bf16);
      } else {  // the last rows when N is not a multiple of 8 (blocks: the padding is not stored)
        alignas(32) float sums[8];
        if (BLOCKS)
          _mm256_store_ps(sums, block<true, 8>(w, xf, m, 8 * t, K));
        else
          for (int64_t n = t * 8; n < N; ++n)
            sums[n - t * 8] = _mm256_cvtss_f32(block<false, 1>(w, xf, m, n, K));  // lane 0: row n
        for (int64_t n = t * 8; n < N; ++n)
          store1(y, m * N + n, sums[n - t * 8] + (b ? b[n] : 0.0f) + (res ? res[m * N + n] : 0.0f), y_bf16);
      }
    }
}

}  // namespace

extern "C" void kernel(const void* x, const uint16_t* w, const float* bias, void* y, int64_t M, int64_t N,
                       int64_t K, int64_t x_bf16, int64_t y_bf16, int64_t has_bias, int64_t blocks, int64_t swiglu,
                       const float* residual, int64_t has_residual) {
  static thread_local std::vector<float> xf;
  xf.resize(M * K);
  float* xfp = xf.data();
  const float* b = has_bias ? bias : nullptr;
  const float* res = has_residual ? residual : nullptr;
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < M * (K / 8); ++i)
      _mm256_storeu_ps(xfp + i * 8, load8(x, i * 8, x_bf16));
    if (blocks)
      gemv<true>(xfp, w, b, y, M, N, K, y_bf16, swiglu, res);
    else
      gemv<false>(xfp, w, b, y, M, N, K, y_bf16, swiglu, res);
  }
}
