// Weight-only int4 and int8 linears with AVX512-VNNI: y = x @ W^T (+ bias), x in bf16 or fp32,
// for every M (decode's GEMV, and prefill, where rows of x reuse each block while it is in cache).
// The quantized siblings of bf16_gemv_avx512.cpp: blocks of 16 rows of W, each one contiguous
// stream, STREAMS of them side by side per thread. Two libraries include this text: woq_avx512.cpp
// (x split into two signed bytes) and woq_a8_avx512.cpp (x in int8 per group: ZEN_WOQ_X8 set to 1
// before the include, X8 below), because both in one took 12 s of g++ where the first alone takes
// 4: the X8 blocks are two thirds of the instantiations, and only
// config.int8_activations_for_weight_only asks for them.
//
// Codes are stored unsigned, u = c + z (z = 8 for int4, 128 for int8), the side of vpdpbusd that
// takes unsigned bytes; it multiplies four of them by four signed bytes and adds the four
// products to an int32 lane, a lane a row of W, so no horizontal sums. x goes to int16 per row
// and group of G (32, 64 or 128) as in woq_avx2.cpp, within +-32639 so that it splits into signed
// bytes, xq = 256 h + l, and the sums are exact integers (two vpdpbusd, for l and h, per four
// codes of a row):
//     y[m, n] = sum_g scale[g, n] xs[m, g] (sum_{k in g} u[n, k] xq[m, k]) + offset'[g, n] xsum[m, g]
// with offset' = offset - z scale stored at packing. A block is a run of records, one per group:
//     codes: 64-byte lines of 16 rows; int8: 4 bytes a row, k .. k + 3; int4: byte j of a row
//            holds k + j (low nibble) and k + 4 + j (high), so one AND and one shift make the
//            bytes of k .. k + 3 and of k + 4 .. k + 7;
//     grouped weights only: scale and offset' per row, [16] each, fp32 or (where every value is a
//     float16 exactly, as GGUF's block scales are) float16: 64 bytes a record instead of 128, 0.625
//     instead of 0.75 bytes a weight at G = 32. A symmetric weight's offset' is -z scale, so its
//     records hold the scales alone and the sums take -z xsum: Q8_0's 1.0625 bytes a weight
//     instead of 1.125, Q4_0's 0.5625 instead of 0.625, the file's own sizes.
// Per-channel weights keep theirs apart, [ceil(N/16), 16], applied once at the end. One stream a
// block: scales in arrays of their own were more streams a block and cost the 17 llama1b-4l
// decode linears a quarter of their bandwidth on Zen 4 (int8: 21-25 against 27-30 GB/s).
// Partial sums: |sum_k u h| <= 255 * 127 * G, 256 times that below 2^31 for G <= 128.
#pragma once
#include "avx512_common.h"

namespace {

using namespace zen_avx512;

constexpr float XQ_LIMIT = 32639.0f;  // 127 * 256 + 127: the largest int16 whose bytes are both signed

template <int BITS>
constexpr int64_t line_codes() {  // codes of a row in one 64-byte line
  return BITS == 4 ? 8 : 4;
}

// a record's [16] scales or offsets: TAIL bytes a value (4: fp32, 2: float16)
template <int TAIL>
ZEN_AVX512 inline __m512 load_tail(const uint8_t* p) {
  if constexpr (TAIL == 2) return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_loadu_ps(reinterpret_cast<const float*>(p));
}

// Blocks b0 .. b0 + S - 1 against rows m0 .. m0 + R - 1 of x, bias added, epilogue applied, stored.
// TAIL: bytes of a grouped record's scale or offset value (4 or 2), 0 for per-channel weights;
// OFFSETS: whether a grouped record holds offsets' after its scales (else they are -z scale).
template <int BITS, int R, int S, int TAIL, bool OFFSETS, bool X8>
ZEN_AVX512 void blocks(const int8_t* xl, const int8_t* xh, const float* xs, const float* xsum, const uint8_t* w,
                       const float* scale, const float* offset, const float* b, void* y, int64_t m0, int64_t b0,
                       int64_t N, int64_t K, int64_t G, bool y_bf16, bool swiglu, const float* res) {
  constexpr bool GROUPED = TAIL != 0;
  const int64_t groups = K / G, record = G * ROWS * BITS / 8 + (OFFSETS ? 2 : 1) * ROWS * TAIL;
  const float z = BITS == 4 ? 8.0f : 128.0f;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
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
    for (int64_t k = 0; k < G; k += line_codes<BITS>()) {
      __m512i l[R][2], h[R][2];  // x's bytes for k .. k + 3 and (int4) k + 4 .. k + 7
      for (int r = 0; r < R; ++r)
        for (int half = 0; half < (BITS == 4 ? 2 : 1); ++half) {
          int32_t four;
          __builtin_memcpy(&four, xl + (m0 + r) * K + g * G + k + 4 * half, 4);
          l[r][half] = _mm512_set1_epi32(four);
          if constexpr (!X8) {
            __builtin_memcpy(&four, xh + (m0 + r) * K + g * G + k + 4 * half, 4);
            h[r][half] = _mm512_set1_epi32(four);
          }
        }
      for (int s = 0; s < S; ++s) {
        const __m512i v = _mm512_loadu_si512(rec + s * groups * record + k * ROWS * BITS / 8);
        if (BITS == 8) {
          for (int r = 0; r < R; ++r) {
            lo[r][s] = _mm512_dpbusd_epi32(lo[r][s], v, l[r][0]);
            if constexpr (!X8) hi[r][s] = _mm512_dpbusd_epi32(hi[r][s], v, h[r][0]);
          }
        } else {
          const __m512i first4 = _mm512_and_si512(v, nibble), next4 = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
          for (int r = 0; r < R; ++r) {
            lo[r][s] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(lo[r][s], first4, l[r][0]), next4, l[r][1]);
            if constexpr (!X8)
              hi[r][s] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(hi[r][s], first4, h[r][0]), next4, h[r][1]);
          }
        }
      }
    }
    for (int s = 0; s < S; ++s) {
      const uint8_t* tail = rec + s * groups * record + G * ROWS * BITS / 8;
      for (int r = 0; r < R; ++r) {
        const int64_t mg = (m0 + r) * groups + g;
        const __m512 dot = _mm512_cvtepi32_ps(X8 ? lo[r][s] : _mm512_add_epi32(lo[r][s], _mm512_slli_epi32(hi[r][s], 8)));
        if (GROUPED && OFFSETS) {
          const __m512 sv = load_tail<TAIL>(tail), ov = load_tail<TAIL>(tail + ROWS * TAIL);
          acc[r][s] = _mm512_fmadd_ps(dot, _mm512_mul_ps(sv, _mm512_set1_ps(xs[mg])), acc[r][s]);
          acc[r][s] = _mm512_fmadd_ps(ov, _mm512_set1_ps(xsum[mg]), acc[r][s]);
        } else if (GROUPED) {  // scale (xs dot - z xsum)
          const __m512 sums = _mm512_fmadd_ps(dot, _mm512_set1_ps(xs[mg]), _mm512_set1_ps(-z * xsum[mg]));
          acc[r][s] = _mm512_fmadd_ps(load_tail<TAIL>(tail), sums, acc[r][s]);
        } else {
          acc[r][s] = _mm512_fmadd_ps(dot, _mm512_set1_ps(xs[mg]), acc[r][s]);
        }
      }
    }
  }
  float total[R] = {};  // per-channel: the sum of the whole row of x, for the offsets
  for (int r = 0; r < R && !GROUPED; ++r)
    for (int64_t g = 0; g < groups; ++g)
      total[r] += xsum[(m0 + r) * groups + g];
  for (int s = 0; s < S; ++s) {
    const __m512 bias = load_bias(b, b0 + s, N);
    const __m512 sv = GROUPED ? _mm512_setzero_ps() : _mm512_loadu_ps(scale + (b0 + s) * ROWS);  // unused if grouped
    const __m512 ov = GROUPED ? _mm512_setzero_ps() : _mm512_loadu_ps(offset + (b0 + s) * ROWS);
    for (int r = 0; r < R; ++r) {
      // per-channel: the row's scale, and its offset' times the row's sum of x
      const __m512 v = GROUPED ? acc[r][s] : _mm512_fmadd_ps(ov, _mm512_set1_ps(total[r]), _mm512_mul_ps(acc[r][s], sv));
      store_block(y, m0 + r, b0 + s, N, _mm512_add_ps(v, bias), y_bf16, swiglu, res);
    }
  }
}

template <int BITS, int TAIL, bool OFFSETS, bool X8>
void all_blocks(const int8_t* xl, const int8_t* xh, const float* xs, const float* xsum, const uint8_t* w,
                const float* scale, const float* offset, const float* b, void* y, int64_t M, int64_t N, int64_t K,
                int64_t G, bool y_bf16, bool swiglu, const float* res) {
  for_block_groups(N, [&](auto streams, int64_t b0) {
    // two rows of x at a time: with four, the lo and hi sums of 4 blocks would not fit the registers
    // (int8 x has no hi sums: four)
    for_row_blocks<X8 ? 4 : 2>(M, [&](auto rows, int64_t m0) {
      blocks<BITS, decltype(rows)::value, decltype(streams)::value, TAIL, OFFSETS, X8>(xl, xh, xs, xsum, w, scale, offset, b,
                                                                                      y, m0, b0, N, K, G, y_bf16, swiglu,
                                                                                      res);
    });
  });
}

// w: ceil(N/16) blocks of K/G records as above; scale, offset': per-channel ones (unread if
// grouped); grouped: 0 per-channel, 1 records with fp32 scales and offsets, 2 with float16 ones, 3
// with fp32 scales alone (symmetric), 4 with float16 ones; y: [M, N] (swiglu: [M, N / 2]), bf16 or
// fp32. G is 32, 64 or 128 and divides K.
// residual: fp32 [M, N] added to y (fp32 then), read only if has_residual.
// X8: x quantized to int8 per row and group (llama.cpp's arithmetic for its Q8_0 and Q4
// blocks): one vpdpbusd per four codes instead of two, for prefill; the sums then take x as
// quantized, xsum included (the z correction cancels exactly), so the result is that of W on the
// quantized x.
template <bool X8>
void woq_linear(const void* x, const uint8_t* w, const float* scale, const float* offset, const float* bias, void* y,
                int64_t M, int64_t N, int64_t K, int64_t G, int64_t x_bf16, int64_t y_bf16, int64_t has_bias,
                int64_t bits, int64_t grouped, int64_t swiglu, const float* residual, int64_t has_residual) {
  static thread_local std::vector<int16_t> xq;
  static thread_local std::vector<int8_t> xl, xh;
  static thread_local std::vector<float> xs, xsum;
  const int64_t groups = K / G;
  xq.resize(M * K);
  xl.resize(M * K);
  xh.resize(M * K);
  xs.resize(M * groups);
  xsum.resize(M * groups);
  int16_t* xqp = xq.data();
  int8_t* xlp = xl.data();
  int8_t* xhp = xh.data();
  float* xsp = xs.data();
  float* xsump = xsum.data();
  const float* b = has_bias ? bias : nullptr;
  const float* res = has_residual ? residual : nullptr;
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < M * groups; ++i) {
      const int64_t at = (i / groups) * K + (i % groups) * G;
      if constexpr (X8) {
        quantize_group_int16(x, at, G, x_bf16, xqp + at, xsp + i, xsump + i, 127.0f);
        int32_t total = 0;
        for (int64_t k = at; k < at + G; ++k) {
          xlp[k] = static_cast<int8_t>(xqp[k]);
          total += xqp[k];
        }
        xsump[i] = xsp[i] * static_cast<float>(total);
        continue;
      }
      quantize_group_int16(x, at, G, x_bf16, xqp + at, xsp + i, xsump + i, XQ_LIMIT);
      for (int64_t k = at; k < at + G; ++k) {  // xq = 256 h + l, both signed
        const int8_t low = static_cast<int8_t>(xqp[k] & 0xFF);
        xlp[k] = low;
        xhp[k] = static_cast<int8_t>((xqp[k] - low) / 256);
      }
    }
    auto run = [&](auto bits_c, auto tail_c, auto offsets_c) {
      all_blocks<decltype(bits_c)::value, decltype(tail_c)::value, decltype(offsets_c)::value, X8>(
          xlp, xhp, xsp, xsump, w, scale, offset, b, y, M, N, K, G, y_bf16, swiglu, res);
    };
    using Four = std::integral_constant<int, 4>;
    using Eight = std::integral_constant<int, 8>;
    using PerChannel = std::integral_constant<int, 0>;
    using Fp32 = std::integral_constant<int, 4>;
    using Fp16 = std::integral_constant<int, 2>;
    using Offsets = std::true_type;
    using ScalesOnly = std::false_type;
    auto run_tails = [&](auto bits_c) {
      switch (grouped) {
        case 1: run(bits_c, Fp32{}, Offsets{}); break;
        case 2: run(bits_c, Fp16{}, Offsets{}); break;
        case 3: run(bits_c, Fp32{}, ScalesOnly{}); break;
        case 4: run(bits_c, Fp16{}, ScalesOnly{}); break;
        default: run(bits_c, PerChannel{}, Offsets{});
      }
    };
    if (bits == 4) run_tails(Four{});
    else run_tails(Eight{});
  }
}

}  // namespace

#ifndef ZEN_WOQ_X8
#define ZEN_WOQ_X8 0
#endif

extern "C" void kernel(const void* x, const uint8_t* w, const float* scale, const float* offset, const float* bias,
                       void* y, int64_t M, int64_t N, int64_t K, int64_t G, int64_t x_bf16, int64_t y_bf16,
                       int64_t has_bias, int64_t bits, int64_t grouped, int64_t swiglu, const float* residual,
                       int64_t has_residual) {
  woq_linear<ZEN_WOQ_X8 != 0>(x, w, scale, offset, bias, y, M, N, K, G, x_bf16, y_bf16, has_bias, bits, grouped,
                              swiglu, residual, has_residual);
}
