// Helpers shared by the AVX2 kernels of this folder. native.py puts this text in place of
// `#include "avx2_common.h"`: Inductor's C++ cache compiles one source string per kernel.
#pragma once
#include <immintrin.h>
#include <omp.h>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace zen_avx2 {

inline __m256 widen_bf16(__m128i h) {  // 8 bf16 -> 8 fp32: a bf16 is the top half of an fp32
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// what a row of K or V holds (decode_attention.h)
constexpr int kFp32 = 0, kBf16 = 1, kInt8 = 2;

inline __m256 load8_int8(const int8_t* x) {  // 8 int8 codes as fp32
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(x))));
}

inline __m256 load8(const void* x, int64_t i, bool bf16) {
  if (bf16)
    return widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i)));
  return _mm256_loadu_ps(static_cast<const float*>(x) + i);
}

// f(std::integral_constant<int, R>{}) for R = rows, 1 .. 6: a register tile's rows as a constant
// (the GEMM's and the prefill attention's tiles of 6 rows, and their last, shorter ones)
template <class F>
inline void with_tile_rows(int64_t rows, F&& f) {
  switch (rows) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    default: f(std::integral_constant<int, 6>{}); break;
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Lane j of the result: the sum of the 8 lanes of acc[j].
inline __m256i reduce8(const __m256i* acc) {
  __m256i t0 = _mm256_hadd_epi32(acc[0], acc[1]);
  __m256i t1 = _mm256_hadd_epi32(acc[2], acc[3]);
  __m256i t2 = _mm256_hadd_epi32(acc[4], acc[5]);
  __m256i t3 = _mm256_hadd_epi32(acc[6], acc[7]);
  __m256i u0 = _mm256_hadd_epi32(t0, t1);
  __m256i u1 = _mm256_hadd_epi32(t2, t3);
  return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
}

inline void store8(void* y, int64_t i, __m256 v, bool bf16) {
  if (!bf16) {
    _mm256_storeu_ps(static_cast<float*>(y) + i, v);
    return;
  }
  // round to nearest even, as a float -> bf16 conversion does (no NaNs come out of this kernel)
  __m256i u = _mm256_castps_si256(v);
  __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd)), 16);
  __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(y) + i), h);
}

inline __m256 reduce8(const __m256* acc) {  // lane j: the sum of the lanes of acc[j]
  __m256 t0 = _mm256_hadd_ps(acc[0], acc[1]);
  __m256 t1 = _mm256_hadd_ps(acc[2], acc[3]);
  __m256 t2 = _mm256_hadd_ps(acc[4], acc[5]);
  __m256 t3 = _mm256_hadd_ps(acc[6], acc[7]);
  __m256 u0 = _mm256_hadd_ps(t0, t1);
  __m256 u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// acc += the 8 rows' integer dot products of one group, scaled back to floats:
//     acc += dot * scale * xs + offset * xsum
// (scale, offset: the weight's per row; xs, xsum: x's scale and exact sum in this group).
inline __m256 add_group(__m256 acc, __m256i dot, __m256 scale, __m256 offset, float xs, float xsum) {
  acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(scale, _mm256_set1_ps(xs)), acc);
  return _mm256_fmadd_ps(offset, _mm256_set1_ps(xsum), acc);
}

// e^x in fp32 (relative error ~2e-7): e^x = 2^n e^r with n = round(x log2 e), |r| <= ln2 / 2,
// e^r by its Taylor series to r^7 (the next term is below 2^-24 on that range).
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln 2 in two parts: exact n * hi
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

inline __m256 silu8(__m256 g) {  // g / (1 + e^-g), the form Inductor's decomposition computes
  return _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
}

// x[i .. i + G) (bf16 or fp32) to int16 in [-limit, limit] with one scale, and its exact sum: the
// error is below 2^-15 of the group's largest value, far finer than bf16's own 2^-8. G is a
// multiple of 16.
inline void quantize_group_int16(const void* x, int64_t i, int64_t G, bool x_bf16, int16_t* xq, float* scale, float* sum,
                                 float limit = 32767.0f) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 amax = _mm256_setzero_ps(), total = _mm256_setzero_ps();
  for (int64_t k = 0; k < G; k += 8) {
    const __m256 v = load8(x, i + k, x_bf16);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v));
    total = _mm256_add_ps(total, v);
  }
  const float mx = hmax(amax);
  *scale = mx > 0 ? mx / limit : 1.0f;
  *sum = hsum(total);
  const __m256 inv = _mm256_set1_ps(mx > 0 ? limit / mx : 0.0f);
  for (int64_t k = 0; k < G; k += 16) {
    const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(load8(x, i + k, x_bf16), inv));
    const __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(load8(x, i + k + 8, x_bf16), inv));
    // packs interleaves 128-bit lanes; the permute puts the 16 values back in order
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + k), _mm256_permute4x64_epi64(_mm256_packs_epi32(a, c), 0xD8));
  }
}

// Output tile t (8 columns) of rows m0 .. m0 + R - 1. tile_acc(tile, acc) computes the R
// accumulators of one tile of W. With swiglu, W's rows come as gate and up tiles in turn
// (tile 2t: gate rows 8t .. 8t + 7, tile 2t + 1: the same up rows) and the output is
// silu(gate) * up, n_out = N / 2 wide: the merged gate/up GEMM never writes its 2N-wide result.
// With a residual (fp32 [M, N], never with swiglu; y is then fp32) y = residual + the sums.
template <int R, class F>
inline void emit_tile(F&& tile_acc, void* y, int64_t m0, int64_t t, int64_t n_out, bool swiglu, bool y_bf16,
                      const float* residual) {
  __m256 a[R];
  if (swiglu) {
    __m256 b[R];
    tile_acc(2 * t, a);
    tile_acc(2 * t + 1, b);
    for (int r = 0; r < R; ++r)
      a[r] = _mm256_mul_ps(silu8(a[r]), b[r]);
  } else {
    tile_acc(t, a);
  }
  for (int r = 0; r < R; ++r)
    store8(y, (m0 + r) * n_out + t * 8,
           residual ? _mm256_add_ps(a[r], _mm256_loadu_ps(residual + (m0 + r) * n_out + t * 8)) : a[r], y_bf16);
}

// f(std::integral_constant<int, R>{}, m0) over blocks of R <= MAX rows covering rows [0, M): a
// kernel unpacks each weight block once per block of rows of x.
template <int MAX = 4, class F>
inline void for_row_blocks(int64_t M, F&& f) {
  static_assert(MAX >= 1 && MAX <= 4, "blocks of 1 to 4 rows");
  int64_t m = 0;
  for (; m + MAX <= M; m += MAX)
    f(std::integral_constant<int, MAX>{}, m);
  const int64_t rest = M - m;  // below MAX
  if constexpr (MAX > 3)
    if (rest == 3) f(std::integral_constant<int, 3>{}, m);
  if constexpr (MAX > 2)
    if (rest == 2) f(std::integral_constant<int, 2>{}, m);
  if constexpr (MAX > 1)
    if (rest == 1) f(std::integral_constant<int, 1>{}, m);
}

// Every output tile of y (8 columns), for every row of x, the tiles shared among the threads:
// tile_acc(rows, m0, tile, acc) computes the accumulators of rows m0 .. m0 + R - 1 of x
// (R = decltype(rows)::value) against one tile of W; emit_tile applies swiglu and the residual.
template <class F>
inline void for_output_tiles(void* y, int64_t M, int64_t N, bool swiglu, bool y_bf16, const float* residual,
                             F&& tile_acc) {
  const int64_t n_out = swiglu ? N / 2 : N, tiles = n_out / 8;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tiles; ++t) {
    for_row_blocks(M, [&](auto rows, int64_t m0) {
      constexpr int R = decltype(rows)::value;
      emit_tile<R>([&](int64_t tile, __m256* acc) { tile_acc(rows, m0, tile, acc); }, y, m0, t, n_out, swiglu, y_bf16,
                   residual);
    });
  }
}

}  // namespace zen_avx2
