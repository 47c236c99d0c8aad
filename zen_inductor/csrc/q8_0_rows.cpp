// Weight-only linear on GGUF's Q8_0 blocks as the file stores them: y = x @ W^T (+ bias), x in
// bf16 or fp32, AVX2. W is [N][K/32] blocks of 34 bytes, a row after another: a block is its
// float16 scale d, then 32 int8 codes c, and W[n, k] = d * c. The same bytes are the token
// embedding table of a tied model, so the output layer computes from the table the embedding
// gathers from: one copy of the model's largest tensor, not two.
// x goes to int16 with one scale per row and block of 32 (error below 2^-15 of the block's
// largest value, as woq_avx2.cpp), and each block's dot product is an exact integer sum by
// vpmaddwd:  y[m, n] = sum_b d[n, b] * xs[m, b] * sum_{k in b} c[n, k] xq[m, k].
// Rows of W go 8 at a time (a tile of the output), up to 4 rows of x sharing each loaded block.
// A block's dot product stays exact; the sum over blocks is in fp32, as the int8 tiles' is.
#include "avx2_common.h"

namespace {

using namespace zen_avx2;

constexpr int64_t kBlock = 32, kBlockBytes = 34;

// The accumulators of output rows 8t .. 8t + 7 for ROWS rows of x from m0. The 8 rows are read
// one after the other, each from its first block to its last: one stream of 8 x K / 32 blocks a
// tile (taken the other way round, a block of each row in turn, the 8 rows were 8 streams and
// the output layer of SmolLM2 took 1.3 ms at M = 1 against 0.8 for the int8 tiles).
template <int ROWS>
void tile_rows(const uint8_t* w, const float* bias, const int16_t* xq, const float* xs, __m256* acc, int64_t m0,
               int64_t t, int64_t K) {
  const int64_t blocks = K / kBlock, row_bytes = blocks * kBlockBytes;
  __m256 sums[ROWS][8];
  for (int j = 0; j < 8; ++j) {
    const uint8_t* row = w + (t * 8 + j) * row_bytes;
    __m256 a[ROWS];
    for (int r = 0; r < ROWS; ++r)
      a[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* block = row + b * kBlockBytes;
      if (b % 2 == 0)  // once a 64-byte line, 4 KB ahead
        _mm_prefetch(reinterpret_cast<const char*>(block) + 4096, _MM_HINT_T0);
      const float d = _cvtsh_ss(*reinterpret_cast<const uint16_t*>(block));
      const __m256i c0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 2)));
      const __m256i c1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 18)));
      for (int r = 0; r < ROWS; ++r) {
        const __m256i* xr = reinterpret_cast<const __m256i*>(xq + (m0 + r) * K + b * kBlock);
        const __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(c0, _mm256_loadu_si256(xr)),
                                             _mm256_madd_epi16(c1, _mm256_loadu_si256(xr + 1)));
        a[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(d * xs[(m0 + r) * blocks + b]), a[r]);
      }
    }
    for (int r = 0; r < ROWS; ++r)
      sums[r][j] = a[r];
  }
  for (int r = 0; r < ROWS; ++r)
    acc[r] = bias ? _mm256_add_ps(reduce8(sums[r]), _mm256_loadu_ps(bias + t * 8)) : reduce8(sums[r]);
}

}  // namespace

extern "C" void kernel(const void* x, const uint8_t* w, const float* bias, void* y, int64_t M, int64_t N, int64_t K,
                       int64_t x_bf16, int64_t y_bf16, int64_t has_bias, int64_t bits, int64_t swiglu,
                       const float* residual, int64_t has_residual) {
  (void)bits;  // 8: the entry's one extra word (see gguf_blocks.py)
  static thread_local std::vector<int16_t> xq_buffer;
  static thread_local std::vector<float> xs_buffer;
  const int64_t blocks = K / kBlock;
  xq_buffer.resize(M * K);
  xs_buffer.resize(M * blocks);
  // the calling thread's buffers: inside the parallel loop the names would be each thread's own
  int16_t* xq = xq_buffer.data();
  float* xs = xs_buffer.data();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < blocks; ++b) {
      float sum;  // (a symmetric weight needs no sum of x)
      quantize_group_int16(x, m * K + b * kBlock, kBlock, x_bf16, xq + m * K + b * kBlock, xs + m * blocks + b, &sum);
    }
  const float* b = has_bias ? bias : nullptr;
  for_output_tiles(y, M, N, swiglu, y_bf16, has_residual ? residual : nullptr,
                   [&](auto rows, int64_t m0, int64_t tile, __m256* acc) {
                     tile_rows<decltype(rows)::value>(w, b, xq, xs, acc, m0, tile, K);
                   });
}
