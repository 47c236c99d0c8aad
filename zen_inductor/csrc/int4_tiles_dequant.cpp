// Dequantize int4 weights in the tile layout of a8w4_avx2.cpp to a row-major fp32 [N, K] matrix,
// for an fp32 GEMM when M is large enough to be compute-bound. Same layout, so both kernels
// share one packed copy of the weight:
//     w[N/8][K/G][8][G/2]; in each 32-byte block of a row, byte i holds c + 8 of code i (low
//     nibble) and of code i + 32 (high nibble); W[n, k] = scale[g, n] * c + offset[g, n].
#include <immintrin.h>
#include <omp.h>
#include <cstdint>

namespace {

inline void expand(float* out, __m128i codes16, __m256 s, __m256 b) {
  _mm256_storeu_ps(out, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes16)), s, b));
  _mm256_storeu_ps(out + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(codes16, 8))), s, b));
}

}  // namespace

extern "C" void kernel(const uint8_t* w, const float* scale, const float* offset, float* out,
                       int64_t N, int64_t K, int64_t G) {
  const int64_t groups = K / G, row_bytes = G / 2, tiles = N / 8;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tiles; ++t) {
    const __m128i low = _mm_set1_epi8(0x0F);
    for (int64_t g = 0; g < groups; ++g) {
      for (int j = 0; j < 8; ++j) {
        const int64_t n = t * 8 + j;
        const __m256 s = _mm256_set1_ps(scale[g * N + n]);
        const __m256 b = _mm256_set1_ps(offset[g * N + n] - 8.0f * scale[g * N + n]);
        const uint8_t* wr = w + ((t * groups + g) * 8 + j) * row_bytes;
        float* o = out + n * K + g * G;
        for (int64_t blk = 0; blk < G / 64; ++blk) {
          for (int half = 0; half < 2; ++half) {
            const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + blk * 32 + half * 16));
            const __m128i lo = _mm_and_si128(packed, low);
            const __m128i hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low);
            expand(o + blk * 64 + half * 16, lo, s, b);       // codes 16 * half + 0..15
            expand(o + blk * 64 + 32 + half * 16, hi, s, b);  // codes 32 + 16 * half + 0..15
          }
        }
      }
    }
  }
}
