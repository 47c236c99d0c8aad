// int8 activations x int4 weights on AVX2 (no VNNI needed): y = x @ W^T (+ bias).
//
// W[n, k] = scale[g, n] * c[n, k] + offset[g, n] with c in [-8, 7] and g = k / G.
// x is quantized inside the call, symmetric int8 with one scale per row and group of G, so
//     y[m, n] = sum_g scale[g, n] * xs[m, g] * sum_{k in g} c[n, k] * xq[m, k]
//             + sum_g offset[g, n] * xsum[m, g]            (xsum: the exact float sum of x in g)
// The inner sum is exact integer arithmetic. vpmaddubsw takes one unsigned operand, so the
// activations are stored as xq + 128 (unsigned) and the weights stay signed, which keeps the
// quantization error of x multiplied by zero-mean codes; the excess 128 * sum_k c[n, k] is
// precomputed per group (colsum128). Pair sums are at most 2 * 255 * 8 = 4080 in magnitude and
// up to 8 are added in 16 bits before vpmaddwd widens them (32640 < 32767).
//
// Weight layout, prepared once at compile time: tiles of 8 output rows, group-major inside a
// tile, so one thread streams one contiguous run of bytes per tile:
//     w[N/8][K/G][8][G/2], and in each 32-byte block of a row (64 codes) byte i holds
//     c + 8 of code i in its low nibble and of code i + 32 in its high nibble.
// G is 64 or 128 (bigger groups are split at packing; 8 partial sums of 4080 fit 16 bits). The
// same packed copy of a weight in groups of 32 holds two groups per 64-code block and scales per
// 32: this kernel does not read it (kernels.py declines such weights for it).
// scale, offset and colsum128 are per tile too, [N/8][K/G][8], next to the tile's codes.
#include "avx2_common.h"

namespace {

using namespace zen_avx2;

// One row of x -> int8 codes, a scale and an exact sum per group.
void quantize_row(const void* x, int64_t row, int64_t K, int64_t G, bool bf16, uint8_t* q, float* xs, float* xsum) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const int64_t base = row * K;
  for (int64_t g0 = 0; g0 < K; g0 += G) {
    __m256 amax = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
    for (int64_t k = g0; k < g0 + G; k += 8) {
      __m256 v = load8(x, base + k, bf16);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v));
      sum = _mm256_add_ps(sum, v);
    }
    const float m = hmax(amax);
    const float scale = m > 0 ? m / 127.0f : 1.0f;
    const __m256 inv = _mm256_set1_ps(m > 0 ? 127.0f / m : 0.0f);
    xs[g0 / G] = scale;
    xsum[g0 / G] = hsum(sum);
    for (int64_t k = g0; k < g0 + G; k += 32) {
      // cvtps rounds half to even, as torch.round does
      __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(load8(x, base + k, bf16), inv));
      __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(load8(x, base + k + 8, bf16), inv));
      __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(load8(x, base + k + 16, bf16), inv));
      __m256i d = _mm256_cvtps_epi32(_mm256_mul_ps(load8(x, base + k + 24, bf16), inv));
      __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
      packed = _mm256_xor_si256(packed, _mm256_set1_epi8(static_cast<char>(0x80)));  // + 128
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + base + k), _mm256_permutevar8x32_epi32(packed, order));
    }
  }
}

// The accumulators of 8 output rows starting at tile * 8, for ROWS rows of x from m0: each weight
// block is unpacked once and used for every row of x, which is what makes small batches cheaper
// than ROWS GEMVs.
template <int ROWS>
void tile_rows(const uint8_t* w, const float* scale, const float* offset, const int32_t* colsum128,
               const float* bias, const uint8_t* q, const float* xs, const float* xsum, __m256* acc,
               int64_t m0, int64_t tile, int64_t N, int64_t K, int64_t G) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i eight = _mm256_set1_epi8(8);
  const int64_t groups = K / G, row_bytes = G / 2;
  const uint8_t* wt = w + tile * 8 * (K / 2);
  for (int r = 0; r < ROWS; ++r)
    acc[r] = bias ? _mm256_loadu_ps(bias + tile * 8) : _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* wg = wt + g * 8 * row_bytes;
    const uint8_t* qg = q + m0 * K + g * G;
    __m256i sums[ROWS][8];
    for (int j = 0; j < 8; ++j) {
      __m256i s16[ROWS];
      for (int r = 0; r < ROWS; ++r)
        s16[r] = _mm256_setzero_si256();
      const uint8_t* wr = wg + j * row_bytes;
      for (int64_t b = 0; b < G / 64; ++b) {
        __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + b * 32));
        __m256i lo = _mm256_sub_epi8(_mm256_and_si256(packed, low), eight);
        __m256i hi = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(packed, 4), low), eight);
        for (int r = 0; r < ROWS; ++r) {
          const uint8_t* qr = qg + r * K + b * 64;
          __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qr));
          __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qr + 32));
          s16[r] = _mm256_add_epi16(s16[r], _mm256_maddubs_epi16(x0, lo));
          s16[r] = _mm256_add_epi16(s16[r], _mm256_maddubs_epi16(x1, hi));
        }
      }
      for (int r = 0; r < ROWS; ++r)
        sums[r][j] = _mm256_madd_epi16(s16[r], ones);
    }
    const __m256i excess = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(colsum128 + (tile * groups + g) * 8));
    const __m256 sv = _mm256_loadu_ps(scale + (tile * groups + g) * 8);
    const __m256 ov = _mm256_loadu_ps(offset + (tile * groups + g) * 8);
    for (int r = 0; r < ROWS; ++r) {
      const int64_t mg = (m0 + r) * groups + g;
      acc[r] = add_group(acc[r], _mm256_sub_epi32(reduce8(sums[r]), excess), sv, ov, xs[mg], xsum[mg]);
    }
  }
}

}  // namespace

extern "C" void kernel(const void* x, const uint8_t* w, const float* scale, const float* offset,
                       const int32_t* colsum128, const float* bias, void* y, int64_t M, int64_t N, int64_t K, int64_t G,
                       int64_t x_bf16, int64_t y_bf16, int64_t has_bias, int64_t swiglu,
                       const float* residual, int64_t has_residual) {
  static thread_local std::vector<uint8_t> q;
  static thread_local std::vector<float> xs, xsum;
  q.resize(M * K);
  xs.resize(M * (K / G));
  xsum.resize(M * (K / G));
  uint8_t* qp = q.data();
  float* xsp = xs.data();
  float* xsump = xsum.data();
  const int64_t out_tiles = swiglu ? N / 16 : N / 8, n_out = swiglu ? N / 2 : N;
  const float* res = has_residual ? residual : nullptr;
  // one parallel region: rows of x are quantized, then tiles of W are shared out
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m)
      quantize_row(x, m, K, G, x_bf16, qp, xsp + m * (K / G), xsump + m * (K / G));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < out_tiles; ++t)
      for_row_blocks(M, [&](auto rows, int64_t m) {
        constexpr int R = decltype(rows)::value;
        auto tile_acc = [&](int64_t tile, __m256* acc) {
          tile_rows<R>(w, scale, offset, colsum128, has_bias ? bias : nullptr, qp, xsp, xsump, acc, m, tile, N, K, G);
        };
        emit_tile<R>(tile_acc, y, m, t, n_out, swiglu, y_bf16, res);
      });
  }
}
