// Dequantize int4 or int8 weights in the tile layouts of woq_avx2.cpp to a row-major fp32 [N, K]
// matrix, for an fp32 GEMM when M is large enough to be compute-bound. Same layouts, so the
// GEMV kernels and this one share one packed copy of a weight:
//     int4: w[N/8][K/B][8][B/2], B = max(G, 64); in each 32-byte block of a row, byte i holds
//           c + 8 of code i (low nibble) and of code i + 32 (high nibble);
//     int8: w[N/8][K/B][8][B], the codes c;
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

// 64 codes of a row, k0 .. k0 + 63 of W, from their 32 (int4) or 64 (int8) bytes: each half of
// 32 codes with the scale and offset of its group (with G = 32 the two halves are two groups)
void codes64(const uint8_t* wb, float* o, int bits, const __m256 s[2], const __m256 b[2]) {
  const __m128i low = _mm_set1_epi8(0x0F);
  for (int half = 0; half < 2; ++half)
    for (int q = 0; q < 2; ++q) {
      if (bits == 8) {
        expand<true>(o + 32 * half + 16 * q, _mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + 32 * half + 16 * q)), s[half], b[half]);
      } else {  // byte i: code i (low nibble), code i + 32 (high)
        const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + 16 * q));
        expand<false>(o + 32 * half + 16 * q, _mm_and_si128(half ? _mm_srli_epi16(packed, 4) : packed, low), s[half], b[half]);
      }
    }
}

}  // namespace

// G (the scales' group) is 32 or a multiple of 64; codes come in blocks of B = max(G, 64).
extern "C" void kernel(const uint8_t* w, const float* scale, const float* offset, float* out,
                       int64_t N, int64_t K, int64_t G, int64_t bits) {
  const int64_t groups = K / G, B = G < 64 ? 64 : G, row_bytes = B * bits / 8, tiles = N / 8;
  const float excess = bits == 4 ? 8.0f : 0.0f;  // int4 codes are stored as c + 8
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tiles; ++t)
    for (int64_t blk = 0; blk < K / B; ++blk)
      for (int j = 0; j < 8; ++j) {
        const int64_t n = t * 8 + j;
        const uint8_t* wr = w + ((t * (K / B) + blk) * 8 + j) * row_bytes;
        for (int64_t k0 = blk * B; k0 < (blk + 1) * B; k0 += 64) {
          __m256 s[2], b[2];
          for (int half = 0; half < 2; ++half) {
            const int64_t p = (t * groups + (k0 + 32 * half) / G) * 8 + j;
            s[half] = _mm256_set1_ps(scale[p]);
            b[half] = _mm256_set1_ps(offset[p] - excess * scale[p]);
          }
          codes64(wr + (k0 - blk * B) * bits / 8, out + n * K + k0, static_cast<int>(bits), s, b);
        }
      }
}
