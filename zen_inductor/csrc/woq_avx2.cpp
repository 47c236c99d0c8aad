// Weight-only int4 and int8 linears on AVX2: y = x @ W^T (+ bias), x in bf16 or fp32, for decode
// and small batches. Weights are packed once in tiles of 8 output rows, group-major inside a
// tile, so one thread streams one contiguous run of bytes per tile:
//   int4: w[N/8][K/G][8][G/2], the layout of a8w4_avx2.cpp (one packed copy serves both): in
//         each 32-byte block of a row, byte i holds u = c + 8 of code i (low nibble) and of code
//         i + 32 (high nibble);
//   int8: w[N/8][K/G][8][G], the codes c themselves.
// Scales and offsets per tile, [N/8][K/G][8], beside the tile's codes (not [K/G][N]: a tile's
// groups N * 4 bytes apart are a page each).
// W[n, k] = scale[g, n] * c + offset[g, n]. x goes to int16 with one scale per row and group
// (error below 2^-15 of the group's largest value: far finer than bf16's own 2^-8, so the kernel
// is as exact as a bf16 x allows), and the dot products are exact integer sums by vpmaddwd (16
// products per instruction, where a float path would convert every code to fp32 first):
//     y[m, n] = sum_g scale[g, n] * xs[m, g] * sum_{k in g} u[n, k] xq[m, k]
//             + (offset[g, n] - z scale[g, n]) * xsum[m, g]      (u = c + z; z = 8 or 0)
// Partial sums: at most 2 * 128 * 32767 a pair, 64 pairs a group (G <= 128): below 2^31. Up to 4
// rows of x share each unpacked weight block. A single row of x with int4 weights (decode) takes
// dot_nibbles instead: the same integer sums from fewer instructions.
#include "avx2_common.h"

namespace {

using namespace zen_avx2;

// 64 codes of one weight row as four vectors of 16 int16.
template <int BITS>
inline void unpack64(const uint8_t* p, __m256i* u) {
  if (BITS == 4) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i lo = _mm256_and_si256(packed, low);                       // codes 0..31
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);  // codes 32..63
    u[0] = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(lo));
    u[1] = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(lo, 1));
    u[2] = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(hi));
    u[3] = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(hi, 1));
  } else {
    for (int i = 0; i < 4; ++i)
      u[i] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * i)));
  }
}

// sum_k u[k] xq[k] over one group (G = 64 or 128) of one weight row, for a single row of x, with
// xq = 256 xhi + xlo split into a signed high and an unsigned low byte. vpmaddubsw multiplies the
// unpacked nibbles by bytes of x directly, where the int16 path widens every code first: 12
// instead of 17 instructions per 64 codes. Exact: a pair is at most 2 * 255 * 15 = 7650 (low) or
// 2 * 15 * 128 (high), and 4 pairs are summed in int16 (30600 < 32767) before widening.
inline __m256i dot_nibbles(const uint8_t* w, const uint8_t* xlo, const int8_t* xhi, int64_t G) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  __m256i lo16 = _mm256_setzero_si256(), hi16 = _mm256_setzero_si256();
  for (int64_t b = 0; b < G / 64; ++b) {
    _mm_prefetch(reinterpret_cast<const char*>(w + b * 32) + 4096, _MM_HINT_T0);
    const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * 32));
    const __m256i c0 = _mm256_and_si256(packed, low);                       // codes 0..31
    const __m256i c1 = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);  // codes 32..63
    const __m256i* l = reinterpret_cast<const __m256i*>(xlo + b * 64);
    const __m256i* h = reinterpret_cast<const __m256i*>(xhi + b * 64);
    lo16 = _mm256_add_epi16(lo16, _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_loadu_si256(l), c0),
                                                    _mm256_maddubs_epi16(_mm256_loadu_si256(l + 1), c1)));
    hi16 = _mm256_add_epi16(hi16, _mm256_add_epi16(_mm256_maddubs_epi16(c0, _mm256_loadu_si256(h)),
                                                    _mm256_maddubs_epi16(c1, _mm256_loadu_si256(h + 1))));
  }
  return _mm256_add_epi32(_mm256_madd_epi16(lo16, _mm256_set1_epi16(1)), _mm256_madd_epi16(hi16, _mm256_set1_epi16(256)));
}

// The accumulators of the 8 output rows of one tile for ROWS rows of x from m0.
template <int ROWS, int BITS>
void tile_rows(const uint8_t* w, const float* scale, const float* offset, const float* bias,
               const int16_t* xq, const uint8_t* xlo, const int8_t* xhi, const float* xs, const float* xsum,
               __m256* acc, int64_t m0, int64_t tile, int64_t N, int64_t K, int64_t G) {
  const int64_t groups = K / G, row_bytes = G * BITS / 8;
  const uint8_t* wt = w + tile * 8 * (K * BITS / 8);
  for (int r = 0; r < ROWS; ++r)
    acc[r] = bias ? _mm256_loadu_ps(bias + tile * 8) : _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* wg = wt + g * 8 * row_bytes;
    __m256i sums[ROWS][8];
    for (int j = 0; j < 8; ++j) {
      __m256i s[ROWS];
      for (int r = 0; r < ROWS; ++r)
        s[r] = _mm256_setzero_si256();
      const uint8_t* wr = wg + j * row_bytes;
      if constexpr (ROWS == 1 && BITS == 4) {  // one row of x: vpmaddubsw on the nibbles as they are
        sums[0][j] = dot_nibbles(wr, xlo + m0 * K + g * G, xhi + m0 * K + g * G, G);
        continue;
      }
      for (int64_t b = 0; b < G / 64; ++b) {
        __m256i u[4];
        // 4 KB ahead in this thread's one stream of tiles: more reads in flight than the hardware
        // prefetcher keeps (int8 at M = 1: 15-17 -> 17-20 GB/s here; int4 is bound by unpacking)
        _mm_prefetch(reinterpret_cast<const char*>(wr + b * 64 * BITS / 8) + 4096, _MM_HINT_T0);
        unpack64<BITS>(wr + b * 64 * BITS / 8, u);
        for (int r = 0; r < ROWS; ++r) {
          const __m256i* xr = reinterpret_cast<const __m256i*>(xq + (m0 + r) * K + g * G + b * 64);
          for (int i = 0; i < 4; ++i)
            s[r] = _mm256_add_epi32(s[r], _mm256_madd_epi16(u[i], _mm256_loadu_si256(xr + i)));
        }
      }
      for (int r = 0; r < ROWS; ++r)
        sums[r][j] = s[r];
    }
    const __m256 sv = _mm256_loadu_ps(scale + (tile * groups + g) * 8);
    const __m256 ov = _mm256_fnmadd_ps(_mm256_set1_ps(BITS == 4 ? 8.0f : 0.0f), sv, _mm256_loadu_ps(offset + (tile * groups + g) * 8));
    for (int r = 0; r < ROWS; ++r) {
      const int64_t mg = (m0 + r) * groups + g;
      acc[r] = add_group(acc[r], reduce8(sums[r]), sv, ov, xs[mg], xsum[mg]);
    }
  }
}

}  // namespace

extern "C" void kernel(const void* x, const uint8_t* w, const float* scale, const float* offset,
                       const float* bias, void* y, int64_t M, int64_t N, int64_t K, int64_t G,
                       int64_t x_bf16, int64_t y_bf16, int64_t has_bias, int64_t bits, int64_t swiglu,
                       const float* residual, int64_t has_residual) {
  static thread_local std::vector<int16_t> xq;
  static thread_local std::vector<float> xs, xsum;
  static thread_local std::vector<uint8_t> xlo;  // int4: xq split in bytes for dot_nibbles
  static thread_local std::vector<int8_t> xhi;
  const int64_t groups = K / G;
  xq.resize(M * K);
  xs.resize(M * groups);
  xsum.resize(M * groups);
  xlo.resize(bits == 4 ? M * K : 0);
  xhi.resize(bits == 4 ? M * K : 0);
  int16_t* xqp = xq.data();
  uint8_t* xlop = xlo.data();
  int8_t* xhip = xhi.data();
  float* xsp = xs.data();
  float* xsump = xsum.data();
  const int64_t out_tiles = swiglu ? N / 16 : N / 8, n_out = swiglu ? N / 2 : N;
  const float* b = has_bias ? bias : nullptr;
  const float* res = has_residual ? residual : nullptr;
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < M * groups; ++i) {
      const int64_t m = i / groups, k0 = (i % groups) * G;
      quantize_group_int16(x, m * K + k0, G, x_bf16, xqp + m * K + k0, xsp + i, xsump + i);
      for (int64_t k = k0; bits == 4 && k < k0 + G; k += 32) {  // xq = 256 * xhi + xlo, in order
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xqp + m * K + k));
        const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xqp + m * K + k + 16));
        const __m256i byte = _mm256_set1_epi16(0xFF);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(xlop + m * K + k),
                            _mm256_permute4x64_epi64(_mm256_packus_epi16(_mm256_and_si256(a, byte), _mm256_and_si256(c, byte)), 0xD8));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(xhip + m * K + k),
                            _mm256_permute4x64_epi64(_mm256_packs_epi16(_mm256_srai_epi16(a, 8), _mm256_srai_epi16(c, 8)), 0xD8));
      }
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < out_tiles; ++t)
      for_row_blocks(M, [&](auto rows, int64_t m) {
        constexpr int R = decltype(rows)::value;
        auto tile_acc = [&](int64_t tile, __m256* acc) {
          if (bits == 4)
            tile_rows<R, 4>(w, scale, offset, b, xqp, xlop, xhip, xsp, xsump, acc, m, tile, N, K, G);
          else
            tile_rows<R, 8>(w, scale, offset, b, xqp, xlop, xhip, xsp, xsump, acc, m, tile, N, K, G);
        };
        emit_tile<R>(tile_acc, y, m, t, n_out, swiglu, y_bf16, res);
      });
  }
}
