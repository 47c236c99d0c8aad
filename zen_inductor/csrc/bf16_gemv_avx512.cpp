// bf16 weights on a CPU with AVX512-BF16 (Zen 4, Sapphire Rapids): y = x @ W^T (+ bias) for a
// few rows of x (decode). vdpbf16ps multiplies pairs of bf16 and adds both products to fp32
// lanes, so W is packed [ceil(N/16), K/2, 16, 2]: a 64-byte line holds k and k+1 of 16 rows of W,
// and a block of 16 rows is one contiguous stream (rows past N are zeros). Decode reads each
// weight byte once, so the speed is how many reads stay in flight: each thread walks STREAMS
// blocks side by side (measured on Zen 4, the 17 llama1b-4l decode linears: 1, 2 and 8 streams
// slower than 4; a software prefetch 0.5-4 KB ahead in each stream slower than none), and rows
// of x past the first four find the blocks in L2 (4 blocks of K = 8192: 1 MB).
#include "avx2_common.h"

namespace {

using namespace zen_avx2;

constexpr int64_t ROWS = 16;     // rows of W in a block: the 16 fp32 lanes of a zmm
constexpr int STREAMS = 4;       // blocks a thread reads side by side

#define ZEN_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

ZEN_AVX512_BF16 inline __mmask16 first(int64_t valid) {
  return valid >= ROWS ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << valid) - 1);
}

// Blocks b0 .. b0 + S - 1 against rows m0 .. m0 + R - 1 of x, bias added, epilogue applied, stored.
template <int R, int S>
ZEN_AVX512_BF16 void blocks(const uint16_t* x, const uint16_t* w, const float* b, void* y, int64_t m0, int64_t b0,
                            int64_t N, int64_t K, bool y_bf16, bool swiglu) {
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
    const int64_t n0 = (b0 + s) * ROWS;
    const __m512 bias = b ? _mm512_maskz_loadu_ps(first(N - n0), b + n0) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) {
      const __m512 v = _mm512_add_ps(acc[r][s], bias);
      if (swiglu) {  // lanes 0-7 gate, 8-15 up: rows of W come as gate and up blocks of 8 in turn
        const __m256 out = _mm256_mul_ps(silu8(_mm512_castps512_ps256(v)), _mm512_extractf32x8_ps(v, 1));
        store8(y, (m0 + r) * (N / 2) + (b0 + s) * 8, out, y_bf16);
      } else if (y_bf16) {
        _mm256_mask_storeu_epi16(static_cast<uint16_t*>(y) + (m0 + r) * N + n0, first(N - n0),
                                 (__m256i)_mm512_cvtneps_pbh(v));  // round to nearest even
      } else {
        _mm512_mask_storeu_ps(static_cast<float*>(y) + (m0 + r) * N + n0, first(N - n0), v);
      }
    }
  }
}

template <int S>
void group(const uint16_t* x, const uint16_t* w, const float* b, void* y, int64_t M, int64_t b0, int64_t N, int64_t K,
           bool y_bf16, bool swiglu) {
  for_row_blocks(M, [&](auto rows, int64_t m0) { blocks<decltype(rows)::value, S>(x, w, b, y, m0, b0, N, K, y_bf16, swiglu); });
}

}  // namespace

// x: bf16 [M, K]; w: packed as above; y: [M, N] (swiglu: [M, N / 2]), bf16 or fp32. K is even.
extern "C" void kernel(const void* x, const uint16_t* w, const float* bias, void* y, int64_t M, int64_t N, int64_t K,
                       int64_t x_bf16, int64_t y_bf16, int64_t has_bias, int64_t swiglu) {
  (void)x_bf16;  // bf16 activations only (kernels.py offers the kernel for nothing else)
  const uint16_t* xb = static_cast<const uint16_t*>(x);
  const float* b = has_bias ? bias : nullptr;
  const int64_t n_blocks = (N + ROWS - 1) / ROWS, groups = (n_blocks + STREAMS - 1) / STREAMS;
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t b0 = g * STREAMS;
    switch (n_blocks - b0 < STREAMS ? n_blocks - b0 : STREAMS) {
      case 1: group<1>(xb, w, b, y, M, b0, N, K, y_bf16, swiglu); break;
      case 2: group<2>(xb, w, b, y, M, b0, N, K, y_bf16, swiglu); break;
      case 3: group<3>(xb, w, b, y, M, b0, N, K, y_bf16, swiglu); break;
      default: group<4>(xb, w, b, y, M, b0, N, K, y_bf16, swiglu); break;
    }
  }
}
