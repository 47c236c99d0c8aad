// bf16 weights on a CPU with AVX512-BF16 (Zen 4, Sapphire Rapids): y = x @ W^T (+ bias) for a
// few rows of x (decode). vdpbf16ps multiplies pairs of bf16 and adds both products to fp32
// lanes, so W is packed [ceil(N/16), K/2, 16, 2]: a 64-byte line holds k and k+1 of 16 rows of W,
// and a block of 16 rows is one contiguous stream (rows past N are zeros). Decode reads each
// weight byte once, so the speed is how many reads stay in flight: each thread walks STREAMS
// blocks side by side (measured on Zen 4, the 17 llama1b-4l decode linears: 1, 2 and 8 streams
// slower than 4; a software prefetch 0.5-4 KB ahead in each stream slower than none), and rows
// of x past the first four find the blocks in L2 (4 blocks of K = 8192: 1 MB).
#include "avx512_common.h"

namespace {

using namespace zen_avx512;

// Blocks b0 .. b0 + S - 1 against rows m0 .. m0 + R - 1 of x, bias added, epilogue applied, stored.
template <int R, int S>
ZEN_AVX512_BF16 void blocks(const uint16_t* x, const uint16_t* w, const float* b, void* y, int64_t m0, int64_t b0,
                            int64_t N, int64_t K, bool y_bf16, bool swiglu, const float* res) {
  __m512 acc[R][S];
  for (int r = 0; r < R; ++r)
    for (int s = 0; s < S; ++s)
      acc[r][s] = _mm512_setzero_ps();
  const uint16_t* xr = x + m0 * K;
  const uint16_t* ws = w + b0 * K * ROWS;
  for (int64_t k = 0; k < K; k += 2) {
    __m512bh xv[R];
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      __builtin_memcpy(&pair, xr + r * K + k, 4);
      xv[r] = (__m512bh)_mm512_set1_epi32(pair);
    }
    for (int s = 0; s < S; ++s) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(ws + s * K * ROWS + k * ROWS);
      for (int r = 0; r < R; ++r)
        acc[r][s] = _mm512_dpbf16_ps(acc[r][s], wv, xv[r]);
    }
  }
  for (int s = 0; s < S; ++s) {
    const __m512 bias = load_bias(b, b0 + s, N);
    for (int r = 0; r < R; ++r)
      store_block(y, m0 + r, b0 + s, N, _mm512_add_ps(acc[r][s], bias), y_bf16, swiglu, res);
  }
}

// The same sums on W as the model holds it, row-major [N, K] (plain): no packed copy. vdpbf16ps
// takes 32 values of a row of W against the same 32 of x, so each row ends in 16 partial sums;
// a block's 16 rows are added across lanes together at the end (sum16). U rows of a block are
// read side by side, and each 32 values of x serve all U (in registers: R U sums, U rows of W).
// With more than one row of x the loop is slow enough to leave streams to start cold at each
// 4 KB page (the hardware prefetcher does not cross one; a row of llama1b is one page): rows are
// asked for 2 KB ahead, past a row's end in the next U rows (Zen 4, llama1b shapes at M = 4:
// 1.2-1.4x the packed GEMV's time without, 1.0-1.2x with; at M = 1 the same requests slowed it).
constexpr int64_t kAhead = 1024;  // values of a row

template <int R, int U>
ZEN_AVX512_BF16 inline void plain_rows(const uint16_t* x, const uint16_t* w, int64_t m0, int64_t n, int64_t K, __mmask32 tail,
                                       __m512 (*partial)[ROWS], int64_t j) {
  __m512 acc[R][U];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < U; ++u) acc[r][u] = _mm512_setzero_ps();
  const uint16_t* wr = w + n * K;
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh wv[U];
    for (int u = 0; u < U; ++u) {
      wv[u] = (__m512bh)_mm512_loadu_si512(wr + u * K + k);
      if (R > 1) {
        const int64_t ahead = k + kAhead;
        _mm_prefetch(reinterpret_cast<const char*>(ahead < K ? wr + u * K + ahead : wr + (u + U) * K + ahead - K), _MM_HINT_T0);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + (m0 + r) * K + k);
      for (int u = 0; u < U; ++u) acc[r][u] = _mm512_dpbf16_ps(acc[r][u], wv[u], xv);
    }
  }
  if (tail) {  // the last K % 32 values; the masked-off lanes load as zeros
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail, x + (m0 + r) * K + k);
      for (int u = 0; u < U; ++u)
        acc[r][u] = _mm512_dpbf16_ps(acc[r][u], (__m512bh)_mm512_maskz_loadu_epi16(tail, wr + u * K + k), xv);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < U; ++u) partial[r][j + u] = acc[r][u];
}

// Lane i: the sum of v[i]'s 16 lanes. Pairs of vectors are interleaved and added, halving the
// vectors and doubling the rows each lane serves: 45 instructions where 16 separate sums across
// lanes take ~130 (at K = 576 those sums were a third of a row's work).
ZEN_AVX512 inline __m512 sum16(const __m512* v) {
  __m512 t[8], u[4], h[2];
  for (int i = 0; i < 8; ++i)  // a lane of 128 bits: [a, b, a, b]
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // [a, b, c, d]
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0x44), _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0xEE));
  for (int i = 0; i < 2; ++i)  // lanes 0-1 for u[2i]'s four rows, 2-3 for u[2i + 1]'s
    h[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88), _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(h[0], h[1], 0x88), _mm512_shuffle_f32x4(h[0], h[1], 0xDD));
}

template <int R>
ZEN_AVX512_BF16 void plain_block(const uint16_t* x, const uint16_t* w, const float* b, void* y, int64_t m0, int64_t blk,
                                 int64_t N, int64_t K, bool y_bf16, bool swiglu, const float* res) {
  constexpr int U = R == 1 ? 8 : 4;  // M = 1: 1.0-1.1x the packed GEMV's time with 8, 1.0-1.25x with 4
  __m512 partial[R][ROWS];
  const int64_t n0 = blk * ROWS, rows = N - n0 < ROWS ? N - n0 : ROWS;
  const __mmask32 tail = K % 32 ? static_cast<__mmask32>((1ull << (K % 32)) - 1) : 0;
  int64_t j = 0;
  for (; j + U <= rows; j += U) plain_rows<R, U>(x, w, m0, n0 + j, K, tail, partial, j);
  for (; j < rows; ++j) plain_rows<R, 1>(x, w, m0, n0 + j, K, tail, partial, j);
  for (int r = 0; r < R; ++r)
    for (int64_t i = rows; i < ROWS; ++i) partial[r][i] = _mm512_setzero_ps();
  const __m512 bias = load_bias(b, blk, N);
  for (int r = 0; r < R; ++r)
    store_block(y, m0 + r, blk, N, _mm512_add_ps(sum16(partial[r]), bias), y_bf16, swiglu, res);
}

}  // namespace

// x: bf16 [M, K]; w: packed as above, or (plain) the row-major [N, K] weight; y: [M, N] (swiglu:
// [M, N / 2]), bf16 or fp32. K is even. residual: fp32 [M, N] added to y (fp32 then), read only if
// has_residual.
extern "C" void kernel(const void* x, const uint16_t* w, const float* bias, void* y, int64_t M, int64_t N, int64_t K,
                       int64_t x_bf16, int64_t y_bf16, int64_t has_bias, int64_t plain, int64_t swiglu,
                       const float* residual, int64_t has_residual) {
  (void)x_bf16;  // bf16 activations only (kernels.py offers the kernel for nothing else)
  const uint16_t* xb = static_cast<const uint16_t*>(x);
  const float* b = has_bias ? bias : nullptr;
  const float* res = has_residual ? residual : nullptr;
  if (plain) {
    const int64_t n_blocks = (N + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < n_blocks; ++blk)
      for_row_blocks(M, [&](auto rows, int64_t m0) {
        plain_block<decltype(rows)::value>(xb, w, b, y, m0, blk, N, K, y_bf16, swiglu, res);
      });
    return;
  }
#pragma omp parallel
  for_block_groups(N, [&](auto streams, int64_t b0) {
    for_row_blocks(M, [&](auto rows, int64_t m0) {
      blocks<decltype(rows)::value, decltype(streams)::value>(xb, w, b, y, m0, b0, N, K, y_bf16, swiglu, res);
    });
  });
}
