// Weight-only int4 and int8 linears on AVX2: y = x @ W^T (+ bias), x in bf16 or fp32, for decode
// and small batches. Weights are packed once in tiles of 8 output rows, block-major inside a
// tile, so one thread streams one contiguous run of bytes per tile. A block is a group of G
// codes of a row, or, for G = 32, two groups (64 codes: B = max(G, 64)):
//   int4: w[N/8][K/B][8][B/2], the layout of a8w4_avx2.cpp (one packed copy serves both): in
//         each 32-byte block of a row, byte i holds u = c + 8 of code i (low nibble) and of code
//         i + 32 (high nibble); with G = 32 the low nibbles are one group, the high ones the next;
//   int8: w[N/8][K/B][8][B], the codes c themselves.
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
// dot_nibbles instead: the same integer sums from fewer instructions. G is 32, 64 or 128 (bigger
// groups are split at packing); with G = 32 each 64-code block keeps the sums of its two groups
// apart, so a weight in GGUF's blocks of 32 keeps its own scales.
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

// sum_k u[k] xq[k] over one block of B codes of one weight row (H groups: 2 when G = 32, the
// low nibbles of each 32-byte block one group and the high ones the next; else 1), for a single
// row of x, with xq = 256 xhi + xlo split into a signed high and an unsigned low byte. vpmaddubsw
// multiplies the unpacked nibbles by bytes of x directly, where the int16 path widens every code
// first: 12 instead of 17 instructions per 64 codes. Exact: a pair is at most 2 * 255 * 15 = 7650
// (low) or 2 * 15 * 128 (high), and at most 4 pairs are summed in int16 (30600 < 32767, B <= 128)
// before widening.
template <int H>
inline void dot_nibbles(const uint8_t* w, const uint8_t* xlo, const int8_t* xhi, int64_t B, __m256i* out) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  __m256i lo16[H], hi16[H];
  for (int h = 0; h < H; ++h)
    lo16[h] = hi16[h] = _mm256_setzero_si256();
  for (int64_t b = 0; b < B / 64; ++b) {
    _mm_prefetch(reinterpret_cast<const char*>(w + b * 32) + 4096, _MM_HINT_T0);
    const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * 32));
    const __m256i c0 = _mm256_and_si256(packed, low);                       // codes 0..31
    const __m256i c1 = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);  // codes 32..63
    const __m256i* l = reinterpret_cast<const __m256i*>(xlo + b * 64);
    const __m256i* hx = reinterpret_cast<const __m256i*>(xhi + b * 64);
    const __m256i l0 = _mm256_maddubs_epi16(_mm256_loadu_si256(l), c0), l1 = _mm256_maddubs_epi16(_mm256_loadu_si256(l + 1), c1);
    const __m256i h0 = _mm256_maddubs_epi16(c0, _mm256_loadu_si256(hx)), h1 = _mm256_maddubs_epi16(c1, _mm256_loadu_si256(hx + 1));
    if constexpr (H == 1) {
      lo16[0] = _mm256_add_epi16(lo16[0], _mm256_add_epi16(l0, l1));
      hi16[0] = _mm256_add_epi16(hi16[0], _mm256_add_epi16(h0, h1));
    } else {  // B = 64: one block, nothing to carry over
      lo16[0] = l0, lo16[1] = l1, hi16[0] = h0, hi16[1] = h1;
    }
  }
  for (int h = 0; h < H; ++h)
    out[h] = _mm256_add_epi32(_mm256_madd_epi16(lo16[h], _mm256_set1_epi16(1)), _mm256_madd_epi16(hi16[h], _mm256_set1_epi16(256)));
}

// The accumulators of the 8 output rows of one tile for ROWS rows of x from m0; H groups a block
// of B = H * G codes (see dot_nibbles).
template <int ROWS, int BITS, int H>
void tile_rows(const uint8_t* w, const float* scale, const float* offset, const float* bias,
               const int16_t* xq, const uint8_t* xlo, const int8_t* xhi, const float* xs, const float* xsum,
               __m256* acc, int64_t m0, int64_t tile, int64_t N, int64_t K, int64_t G) {
  const int64_t B = G * H, groups = K / G, row_bytes = B * BITS / 8;
  const uint8_t* wt = w + tile * 8 * (K * BITS / 8);
  for (int r = 0; r < ROWS; ++r)
    acc[r] = bias ? _mm256_loadu_ps(bias + tile * 8) : _mm256_setzero_ps();
  for (int64_t blk = 0; blk < K / B; ++blk) {
    const uint8_t* wg = wt + blk * 8 * row_bytes;
    __m256i sums[H][ROWS][8];
    for (int j = 0; j < 8; ++j) {
      const uint8_t* wr = wg + j * row_bytes;
      if constexpr (ROWS == 1 && BITS == 4) {  // one row of x: vpmaddubsw on the nibbles as they are
        __m256i d[H];
        dot_nibbles<H>(wr, xlo + m0 * K + blk * B, xhi + m0 * K + blk * B, B, d);
        for (int h = 0; h < H; ++h)
          sums[h][0][j] = d[h];
        continue;
      }
      __m256i s[H][ROWS];
      for (int h = 0; h < H; ++h)
        for (int r = 0; r < ROWS; ++r)
          s[h][r] = _mm256_setzero_si256();
      for (int64_t b = 0; b < B / 64; ++b) {
        __m256i u[4];
        // 4 KB ahead in this thread's one stream of tiles: more reads in flight than the hardware
        // prefetcher keeps (int8 at M = 1: 15-17 -> 17-20 GB/s here; int4 is bound by unpacking)
        _mm_prefetch(reinterpret_cast<const char*>(wr + b * 64 * BITS / 8) + 4096, _MM_HINT_T0);
        unpack64<BITS>(wr + b * 64 * BITS / 8, u);
        for (int r = 0; r < ROWS; ++r) {
          const __m256i* xr = reinterpret_cast<const __m256i*>(xq + (m0 + r) * K + blk * B + b * 64);
          for (int i = 0; i < 4; ++i)  // u[0], u[1]: codes 0..31 of the 64; u[2], u[3]: 32..63
            s[H == 2 ? i / 2 : 0][r] = _mm256_add_epi32(s[H == 2 ? i / 2 : 0][r], _mm256_madd_epi16(u[i], _mm256_loadu_si256(xr + i)));
        }
      }
      for (int h = 0; h < H; ++h)
        for (int r = 0; r < ROWS; ++r)
          sums[h][r][j] = s[h][r];
    }
    for (int h = 0; h < H; ++h) {
      const int64_t g = blk * H + h;
      const __m256 sv = _mm256_loadu_ps(scale + (tile * groups + g) * 8);
      const __m256 ov = _mm256_fnmadd_ps(_mm256_set1_ps(BITS == 4 ? 8.0f : 0.0f), sv, _mm256_loadu_ps(offset + (tile * groups + g) * 8));
      for (int r = 0; r < ROWS; ++r) {
        const int64_t mg = (m0 + r) * groups + g;
        acc[r] = add_group(acc[r], reduce8(sums[h][r]), sv, ov, xs[mg], xsum[mg]);
      }
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
            (G == 32 ? tile_rows<R, 4, 2> : tile_rows<R, 4, 1>)(w, scale, offset, b, xqp, xlop, xhip, xsp, xsump, acc, m, tile, N, K, G);
          else
            (G == 32 ? tile_rows<R, 8, 2> : tile_rows<R, 8, 1>)(w, scale, offset, b, xqp, xlop, xhip, xsp, xsump, acc, m, tile, N, K, G);
        };
        emit_tile<R>(tile_acc, y, m, t, n_out, swiglu, y_bf16, res);
      });
  }
}
