// Dequantize int4 or int8 weights in the tile layouts of woq_avx2.cpp to a row-major fp32 [N, K]
// matrix, for an fp32 GEMM when M is large enough to be compute-bound. Same layouts, so the
// GEMV kernels and this one share one packed copy of a weight:
//     int4: w[N/8][K/G][8][G/2]; in each 32-byte block of a row, byte i holds c + 8 of code i
//           (low nibble) and of code i + 32 (high nibble);
//     int8: w[N/8][K/G][8][G], the codes c;
// W[n, k] = scale[g, n] * c + offset[g, n], scales and offsets stored per tile: [N/8][K/G][8].
#include <immintrin.h>
#include <omp.h>
#include <cstdint>

namespace {

// 16 codes (unsigned bytes, or signed when SIGNED) -> 16 floats c * s + b
template <bool SIGNED>
inline void expand(float* out, __m128i codes16, __m256 s, __m256 b) {
  const __m128i upper = _mm_srli_si128(codes16, 8);
  const __m256i c0 = SIGNED ? _mm256_cvtepi8_epi32(codes16) : _mm256_cvtepu8_epi32(codes16);
  const __m256i c1 = SIGNED ? _mm256_cvtepi8_epi32(upper) : _mm256_cvtepu8_epi32(upper);
  _mm256_storeu_ps(out, _mm256_fmadd_ps(_mm256_cvtepi32_ps(c0), s, b));
  _mm256_storeu_ps(out + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(c1), s, b));
}

void row_int4(const uint8_t* wr, float* o, int64_t G, __m256 s, __m256 b) {
  const __m128i low = _mm_set1_epi8(0x0F);
  for (int64_t blk = 0; blk < G / 64; ++blk)
    for (int half = 0; half < 2; ++half) {
      const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + blk * 32 + half * 16));
      expand<false>(o + blk * 64 + half * 16, _mm_and_si128(packed, low), s, b);                           // codes 16 half + 0..15
      expand<false>(o + blk * 64 + 32 + half * 16, _mm_and_si128(_mm_srli_epi16(packed, 4), low), s, b);  // 32 + 16 half + 0..15
    }
}

void row_int8(const uint8_t* wr, float* o, int64_t G, __m256 s, __m256 b) {
  for (int64_t i = 0; i < G; i += 16)
    expand<true>(o + i, _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + i)), s, b);
}

}  // namespace

extern "C" void kernel(const uint8_t* w, const float* scale, const float* offset, float* out,
                       int64_t N, int64_t K, int64_t G, int64_t bits) {
  const int64_t groups = K / G, row_bytes = G * bits / 8, tiles = N / 8;
  const float excess = bits == 4 ? 8.0f : 0.0f;  // int4 codes are stored as c + 8
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tiles; ++t)
    for (int64_t g = 0; g < groups; ++g)
      for (int j = 0; j < 8; ++j) {
        const int64_t n = t * 8 + j;
        const int64_t p = (t * groups + g) * 8 + j;
        const __m256 s = _mm256_set1_ps(scale[p]);
        const __m256 b = _mm256_set1_ps(offset[p] - excess * scale[p]);
        const uint8_t* wr = w + ((t * groups + g) * 8 + j) * row_bytes;
        if (bits == 4)
          row_int4(wr, out + n * K + g * G, G, s, b);
        else
          row_int8(wr, out + n * K + g * G, G, s, b);
      }
}
