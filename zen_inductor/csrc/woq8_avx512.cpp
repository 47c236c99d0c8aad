// Weight-only int8 linears with AVX512-VNNI: y = x @ W^T (+ bias), x in bf16 or fp32, for decode.
// The int8 sibling of bf16_gemv_avx512.cpp: blocks of 16 rows of W, each one contiguous stream,
// STREAMS of them side by side per thread. x goes to int16 per row and group of G (64 or 128) as
// in woq_avx2.cpp, split in bytes xq = 256 (h - 128) + l (l, h unsigned: vpdpbusd's unsigned
// side), so the sums are exact integers:
//     sum_k c xq = sum_k c l + 256 (sum_k c h - 128 sum_k c)
// A block is a run of records, one per group of G columns of W:
//     codes [G/4, 16, 4] int8: a 64-byte line holds k .. k + 3 of the 16 rows, the four bytes
//         vpdpbusd multiplies by four bytes of x and adds to one int32 lane (a lane a row of W:
//         no horizontal sums), two vpdpbusd per 64 codes;
//     128 * the codes' sum per row, [16] int32;
//     grouped weights only: scale and offset per row, [16] fp32 each.
// Per-channel weights keep scale and offset apart, [ceil(N/16), 16], applied once at the end.
// One stream a block: scales in arrays of their own were 3 more streams a block, and cost the
// 17 llama1b-4l decode linears a quarter of their bandwidth on Zen 4 (21-25 against 27-30 GB/s).
// Partial sums: |sum_k c (h - 128)| <= 128 * 128 * G, 256 times that below 2^31 for G <= 128.
#include "avx512_common.h"

namespace {

using namespace zen_avx512;

// Blocks b0 .. b0 + S - 1 against rows m0 .. m0 + R - 1 of x, bias added, epilogue applied, stored.
template <int R, int S, bool GROUPED>
ZEN_AVX512 void blocks(const uint8_t* xl, const uint8_t* xh, const float* xs, const float* xsum, const uint8_t* w,
                       const float* scale, const float* offset, const float* b, void* y, int64_t m0, int64_t b0,
                       int64_t N, int64_t K, int64_t G, bool y_bf16, bool swiglu) {
  const int64_t groups = K / G, record = G * ROWS + (GROUPED ? 3 : 1) * 64;
  __m512 acc[R][S];
  for (int s = 0; s < S; ++s)
    for (int r = 0; r < R; ++r)
      acc[r][s] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i lo[R][S], hi[R][S];
    for (int r = 0; r < R; ++r)
      for (int s = 0; s < S; ++s)
        lo[r][s] = hi[r][s] = _mm512_setzero_si512();
    const uint8_t* rec = w + (b0 * groups + g) * record;
    for (int64_t k = 0; k < G; k += 4) {
      __m512i l[R], h[R];
      for (int r = 0; r < R; ++r) {
        int32_t four;
        __builtin_memcpy(&four, xl + (m0 + r) * K + g * G + k, 4);
        l[r] = _mm512_set1_epi32(four);
        __builtin_memcpy(&four, xh + (m0 + r) * K + g * G + k, 4);
        h[r] = _mm512_set1_epi32(four);
      }
      for (int s = 0; s < S; ++s) {
        const __m512i wv = _mm512_loadu_si512(rec + s * groups * record + k * ROWS);
        for (int r = 0; r < R; ++r) {
          lo[r][s] = _mm512_dpbusd_epi32(lo[r][s], l[r], wv);
          hi[r][s] = _mm512_dpbusd_epi32(hi[r][s], h[r], wv);
        }
      }
    }
    for (int s = 0; s < S; ++s) {
      const uint8_t* tail = rec + s * groups * record + G * ROWS;
      const __m512i cs = _mm512_loadu_si512(tail);
      for (int r = 0; r < R; ++r) {
        const int64_t mg = (m0 + r) * groups + g;
        const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(lo[r][s], _mm512_slli_epi32(_mm512_sub_epi32(hi[r][s], cs), 8)));
        if (GROUPED) {
          const __m512 sv = _mm512_loadu_ps(tail + 64), ov = _mm512_loadu_ps(tail + 128);
          acc[r][s] = _mm512_fmadd_ps(dot, _mm512_mul_ps(sv, _mm512_set1_ps(xs[mg])), acc[r][s]);
          acc[r][s] = _mm512_fmadd_ps(ov, _mm512_set1_ps(xsum[mg]), acc[r][s]);
        } else {
          acc[r][s] = _mm512_fmadd_ps(dot, _mm512_set1_ps(xs[mg]), acc[r][s]);
        }
      }
    }
  }
  for (int s = 0; s < S; ++s) {
    const __m512 bias = load_bias(b, b0 + s, N);
    for (int r = 0; r < R; ++r) {
      __m512 v = acc[r][s];
      if (!GROUPED) {  // the row's scale, and its offset times the sum of the whole row of x
        float total = 0;
        for (int64_t g = 0; g < groups; ++g)
          total += xsum[(m0 + r) * groups + g];
        const __m512 sv = _mm512_loadu_ps(scale + (b0 + s) * ROWS), ov = _mm512_loadu_ps(offset + (b0 + s) * ROWS);
        v = _mm512_fmadd_ps(ov, _mm512_set1_ps(total), _mm512_mul_ps(v, sv));
      }
      store_block(y, m0 + r, b0 + s, N, _mm512_add_ps(v, bias), y_bf16, swiglu);
    }
  }
}

template <bool GROUPED>
void all_blocks(const uint8_t* xl, const uint8_t* xh, const float* xs, const float* xsum, const uint8_t* w,
                const float* scale, const float* offset, const float* b, void* y, int64_t M, int64_t N, int64_t K,
                int64_t G, bool y_bf16, bool swiglu) {
  for_block_groups(N, [&](auto streams, int64_t b0) {
    constexpr int S = decltype(streams)::value;
    // two rows of x at a time: four (lo and hi sums of 4 blocks each) would not fit the registers
    for (int64_t m0 = 0; m0 < M; m0 += 2) {
      if (m0 + 2 <= M)
        blocks<2, S, GROUPED>(xl, xh, xs, xsum, w, scale, offset, b, y, m0, b0, N, K, G, y_bf16, swiglu);
      else
        blocks<1, S, GROUPED>(xl, xh, xs, xsum, w, scale, offset, b, y, m0, b0, N, K, G, y_bf16, swiglu);
    }
  });
}

}  // namespace

// w: ceil(N/16) blocks of K/G records as above; scale, offset: per-channel ones (unread if
// grouped); y: [M, N] (swiglu: [M, N / 2]), bf16 or fp32. G is 64 or 128 and divides K.
extern "C" void kernel(const void* x, const uint8_t* w, const float* scale, const float* offset, const float* bias,
                       void* y, int64_t M, int64_t N, int64_t K, int64_t G, int64_t x_bf16, int64_t y_bf16,
                       int64_t has_bias, int64_t grouped, int64_t swiglu) {
  static thread_local std::vector<int16_t> xq;
  static thread_local std::vector<uint8_t> xl, xh;
  static thread_local std::vector<float> xs, xsum;
  const int64_t groups = K / G;
  xq.resize(M * K);
  xl.resize(M * K);
  xh.resize(M * K);
  xs.resize(M * groups);
  xsum.resize(M * groups);
  int16_t* xqp = xq.data();
  uint8_t* xlp = xl.data();
  uint8_t* xhp = xh.data();
  float* xsp = xs.data();
  float* xsump = xsum.data();
  const float* b = has_bias ? bias : nullptr;
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < M * groups; ++i) {
      const int64_t at = (i / groups) * K + (i % groups) * G;
      quantize_group_int16(x, at, G, x_bf16, xqp + at, xsp + i, xsump + i);
      for (int64_t k = at; k < at + G; ++k) {  // xq = 256 (h - 128) + l
        const uint16_t u = static_cast<uint16_t>(xqp[k]) ^ 0x8000;  // xq + 32768
        xlp[k] = static_cast<uint8_t>(u);
        xhp[k] = static_cast<uint8_t>(u >> 8);
      }
    }
    if (grouped)
      all_blocks<true>(xlp, xhp, xsp, xsump, w, scale, offset, b, y, M, N, K, G, y_bf16, swiglu);
    else
      all_blocks<false>(xlp, xhp, xsp, xsump, w, scale, offset, b, y, M, N, K, G, y_bf16, swiglu);
  }
}
