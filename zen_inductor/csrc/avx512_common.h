// Helpers shared by the AVX-512 kernels of this folder: blocks of 16 rows of W, one fp32 lane
// each. Inductor builds our sources with its own ISA flags (AVX2 or AVX-512F, not BF16 or VNNI
// everywhere), so these functions carry their target themselves and the callers check the CPU.
// The target leaves AVX512-BF16 out: Ice Lake and Cascade Lake Xeons have AVX-512 and VNNI
// without it, and only bf16_gemv_avx512.cpp multiplies in bf16 (ZEN_AVX512_BF16).
#pragma once
#include "avx2_common.h"

#define ZEN_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#define ZEN_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16")))

namespace zen_avx512 {

using namespace zen_avx2;

constexpr int64_t ROWS = 16;  // rows of W in a block: the 16 fp32 lanes of a zmm
constexpr int STREAMS = 4;    // blocks a thread reads side by side (see bf16_gemv_avx512.cpp)

ZEN_AVX512 inline __mmask16 first(int64_t valid) {
  return valid >= ROWS ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << valid) - 1);
}

// 16 fp32 to bf16, rounded to nearest even as store8 rounds (vcvtneps2bf16 would need AVX512-BF16;
// the same bits for every finite value that is not a denormal, and no NaNs come out of these kernels)
ZEN_AVX512 inline __m256i round_to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd)), 16));
}

// Row m of y gets block b's 16 sums v (bias added): bf16 (rounded to nearest even) or fp32,
// only the columns below N. With swiglu, lanes 0-7 are gate and 8-15 up (rows of W come as gate
// and up blocks of 8 in turn) and 8 columns of silu(gate) * up go to y, which is N / 2 wide.
// With a residual (fp32 [M, N], [M, N / 2] with swiglu; y is then fp32) y = residual + v, or +
// the product: the add of patterns/residual_add.py done here, before the other core's half of y
// crosses over to it.
ZEN_AVX512 inline void store_block(void* y, int64_t m, int64_t b, int64_t N, __m512 v, bool y_bf16, bool swiglu,
                                   const float* residual) {
  const int64_t n0 = b * ROWS;
  if (swiglu) {  // the residual is [M, N / 2]: added to the product, as the AVX2 kernels add it
    __m256 out = _mm256_mul_ps(silu8(_mm512_castps512_ps256(v)), _mm512_extractf32x8_ps(v, 1));
    if (residual)
      out = _mm256_add_ps(out, _mm256_loadu_ps(residual + m * (N / 2) + b * 8));
    store8(y, m * (N / 2) + b * 8, out, y_bf16);
    return;
  }
  if (residual)
    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(first(N - n0), residual + m * N + n0));
  if (y_bf16) {
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(y) + m * N + n0, first(N - n0), round_to_bf16(v));
  } else {
    _mm512_mask_storeu_ps(static_cast<float*>(y) + m * N + n0, first(N - n0), v);
  }
}

ZEN_AVX512 inline __m512 load_bias(const float* b, int64_t block, int64_t N) {
  return b ? _mm512_maskz_loadu_ps(first(N - block * ROWS), b + block * ROWS) : _mm512_setzero_ps();
}

// f(std::integral_constant<int, S>{}, b0) for each group of up to STREAMS blocks of the N / 16
// blocks, the groups shared among the threads
template <class F>
inline void for_block_groups(int64_t N, F&& f) {
  const int64_t n_blocks = (N + ROWS - 1) / ROWS, groups = (n_blocks + STREAMS - 1) / STREAMS;
#pragma omp for schedule(static)
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t b0 = g * STREAMS;
    switch (n_blocks - b0 < STREAMS ? n_blocks - b0 : STREAMS) {
      case 1: f(std::integral_constant<int, 1>{}, b0); break;
      case 2: f(std::integral_constant<int, 2>{}, b0); break;
      case 3: f(std::integral_constant<int, 3>{}, b0); break;
      default: f(std::integral_constant<int, STREAMS>{}, b0); break;
    }
  }
}

}  // namespace zen_avx512
