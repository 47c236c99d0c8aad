// Dynamic int8 activations x int8 per-channel weights on the model's own rows: y = x @ W^T
// (+ bias), W the [N, K] int8 rows the model holds and scale its [N] fp32 scales. The int8
// linears of torchao's dynamic-activation formats keep W so, and the prefill's _int_mm reads it as
// it is (W^T a view): decode on the same bytes needs no packed copy beside the model's. A linear
// the pass merged (q/k/v, gate/up) has its rows in up to three of the model's tensors w0-w2:
// tiles[t] says where tile t (rows 8t .. 8t + 7 of W) lies, tensor << 32 | its first row there.
//
// Written once for two dot-product loops (a8w8_rows_avx2.cpp: vpmaddubsw on 32 bytes;
// a8w8_rows_avx512.cpp: vpdpbusd on 64), each defining before it includes this text
//   dot_rows<R>(tile, xq, m0, K, sums): the exact int32 dot products of the 8 rows from tile
//   (K bytes apart) with rows m0 .. m0 + R - 1 of xq, sums[r][j] a __m256i whose 8 lanes add up
//   to row j's.
// x goes to int8 as torchao's dynamic activations do (int8_row_quantize.h), and the integer sums
// are scaled in _int_mm's order: both builds compute aten_int_mm_da8's output bit for bit.
// Rows of W go 8 at a time (a tile of the output), each read from its first byte to its last,
// up to 4 rows of x sharing each loaded line.
#pragma once
#include <algorithm>
#include <vector>

#include "avx2_common.h"
#include "int8_row_quantize.h"

namespace {

using namespace zen_avx2;

// The outputs of rows 8t .. 8t + 7 of W for ROWS rows of x from m0 (scales and bias applied).
template <int ROWS>
void tile_rows(const int8_t* tile, const float* ws, const float* bias, const int8_t* xq, const float* xs, __m256* acc,
               int64_t m0, int64_t t, int64_t K) {
  __m256i sums[ROWS][8];
  dot_rows<ROWS>(tile, xq, m0, K, sums);
  const __m256 w_scale = _mm256_loadu_ps(ws + t * 8);
  for (int r = 0; r < ROWS; ++r) {
    // (dot * x's scale) * w's scale: the order of _int_mm's output scaled in aten_int_mm_da8
    const __m256 y = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(reduce8(sums[r])), _mm256_set1_ps(xs[m0 + r])), w_scale);
    acc[r] = bias ? _mm256_add_ps(y, _mm256_loadu_ps(bias + t * 8)) : y;
  }
}

}  // namespace

extern "C" void kernel(const void* x, const int64_t* tiles, const float* scale, const int8_t* w0, const int8_t* w1,
                       const int8_t* w2, const float* bias, void* y, int64_t M, int64_t N, int64_t K, int64_t x_bf16,
                       int64_t y_bf16, int64_t has_bias, int64_t swiglu, const float* residual, int64_t has_residual) {
  const int8_t* const sources[3] = {w0, w1, w2};
  static thread_local std::vector<int8_t> xq_buffer;
  static thread_local std::vector<float> xs_buffer;
  xq_buffer.resize(M * K);
  xs_buffer.resize(M);
  // the calling thread's buffers: inside the parallel loop the names would be each thread's own
  int8_t* xq = xq_buffer.data();
  float* xs = xs_buffer.data();
  for (int64_t m = 0; m < M; ++m)
    quantize_row(x, m, K, x_bf16, xq + m * K, xs + m);
  const float* b = has_bias ? bias : nullptr;
  for_output_tiles(y, M, N, swiglu, y_bf16, has_residual ? residual : nullptr,
                   [&](auto rows, int64_t m0, int64_t tile, __m256* acc) {
                     const int8_t* rows_at = sources[tiles[tile] >> 32] + (tiles[tile] & 0xffffffff) * K;
                     tile_rows<decltype(rows)::value>(rows_at, scale, b, xq, xs, acc, m0, tile, K);
                   });
}
