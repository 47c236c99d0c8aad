// a8w8_rows.h's dot products with AVX512-VNNI: vpdpbusd multiplies 64 unsigned bytes by 64
// signed ones and adds each four products to an int32 lane, one instruction where AVX2 takes
// vpmaddubsw and vpmaddwd on half the bytes. The unsigned side is |w| (-128 becomes 128) and x
// takes w's sign: AVX-512 has no vpsignb, so x is negated under the mask of w's sign bits
// (where w is 0, |w| is 0 and x's sign does not matter). x stays within +-127: no overflow.
// A row's tail of 32 bytes (K is a multiple of 32) is read under a byte mask.
// Measured against the AVX2 build on an Ice Lake Xeon (llama1b-4l's int8 linears): 0.9-1.5x at
// M = 16, within the noise at M = 1-4 (benchmarks/results/linears-llama1b-4l-icelake.md).
#include "avx512_common.h"

namespace {

// Four rows of W side by side (four streams a thread, K bytes apart), as the blocks16 kernels walk
// four blocks: one row at a time left a core's memory reads one stream deep
template <int ROWS>
ZEN_AVX512 void dot_rows(const int8_t* tile, const int8_t* xq, int64_t m0, int64_t K, __m256i (*sums)[8]) {
  constexpr int S = 4;
  const __m512i zero = _mm512_setzero_si512();
  for (int j0 = 0; j0 < 8; j0 += S) {
    const int8_t* rows = tile + j0 * K;
    __m512i a[ROWS][S];
    for (int r = 0; r < ROWS; ++r)
      for (int s = 0; s < S; ++s)
        a[r][s] = zero;
    for (int64_t k = 0; k < K; k += 64) {
      const __mmask64 valid = K - k >= 64 ? ~0ULL : (1ULL << (K - k)) - 1;
      __m512i magnitude[S];
      __mmask64 negative[S];
      for (int s = 0; s < S; ++s) {
        _mm_prefetch(reinterpret_cast<const char*>(rows + s * K + k) + 4096, _MM_HINT_T0);
        const __m512i v = _mm512_maskz_loadu_epi8(valid, rows + s * K + k);
        magnitude[s] = _mm512_abs_epi8(v);
        negative[s] = _mm512_movepi8_mask(v);
      }
      for (int r = 0; r < ROWS; ++r) {
        const __m512i xr = _mm512_maskz_loadu_epi8(valid, xq + (m0 + r) * K + k);
        for (int s = 0; s < S; ++s)
          a[r][s] = _mm512_dpbusd_epi32(a[r][s], magnitude[s], _mm512_mask_sub_epi8(xr, negative[s], zero, xr));
      }
    }
    for (int r = 0; r < ROWS; ++r)
      for (int s = 0; s < S; ++s)
        sums[r][j0 + s] = _mm256_add_epi32(_mm512_castsi512_si256(a[r][s]), _mm512_extracti64x4_epi64(a[r][s], 1));
  }
}

}  // namespace

#include "a8w8_rows.h"
