// a8w8_rows.h's dot products with AVX2: a dot product of four byte pairs is vpmaddubsw on |w|
// (unsigned, up to 128) and x carrying w's sign (x within +-127, so negating never overflows),
// then vpmaddwd into int32 lanes: each 16-bit pair sum stays below 2 * 128 * 127, and K up to
// 2^20 stays far below 2^31.
#include "avx2_common.h"

namespace {

using namespace zen_avx2;

template <int ROWS>
void dot_rows(const int8_t* tile, const int8_t* xq, int64_t m0, int64_t K, __m256i (*sums)[8]) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int j = 0; j < 8; ++j) {
    const int8_t* row = tile + j * K;
    __m256i a[ROWS];
    for (int r = 0; r < ROWS; ++r)
      a[r] = _mm256_setzero_si256();
    for (int64_t k = 0; k < K; k += 32) {
      if (k % 64 == 0)  // once a 64-byte line, 4 KB ahead
        _mm_prefetch(reinterpret_cast<const char*>(row + k) + 4096, _MM_HINT_T0);
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k));
      const __m256i magnitude = _mm256_abs_epi8(v);  // -128 becomes 128: right as an unsigned byte
      for (int r = 0; r < ROWS; ++r) {
        const __m256i xr = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + (m0 + r) * K + k));
        const __m256i pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(xr, v));
        a[r] = _mm256_add_epi32(a[r], _mm256_madd_epi16(pairs, ones));
      }
    }
    for (int r = 0; r < ROWS; ++r)
      sums[r][j] = a[r];
  }
}

}  // namespace

#include "a8w8_rows.h"
