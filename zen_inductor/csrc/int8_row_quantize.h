// A row of x (bf16 or fp32) to int8 as torchao's dynamic activations quantize it: one symmetric
// scale a row, max |x| / 127 clamped below at 1e-7, then x / scale rounded to nearest even and
// clamped to +-127. Each step is ATen's (an fp32 division, not a product with the inverse), so
// the codes and scale are aten_int_mm_da8's reference quantization (kernels/int8_rows.py) bit for
// bit: the own-rows GEMVs (a8w8_rows.h) and the prefill's _int_mm then see the same int8 x.
// K a multiple of 8.
#pragma once
#include <algorithm>

#include "avx2_common.h"

namespace zen_avx2 {

constexpr float kInt8Max = 127.0f;

inline void quantize_row(const void* x, int64_t m, int64_t K, bool x_bf16, int8_t* xq, float* scale) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 amax = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8)
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, load8(x, m * K + k, x_bf16)));
  const float s = std::max(hmax(amax), 1e-7f) / kInt8Max;
  *scale = s;
  const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(-kInt8Max), hi = _mm256_set1_ps(kInt8Max);
  for (int64_t k = 0; k < K; k += 8) {
    const __m256 q = _mm256_round_ps(_mm256_div_ps(load8(x, m * K + k, x_bf16), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i v = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(q, lo), hi));
    const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(xq + k), _mm_packs_epi16(w16, w16));
  }
}

}  // namespace zen_avx2
