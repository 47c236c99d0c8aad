// GEMM on GGUF's Q8_0 blocks as the file stores them, for many rows of x (a prefill): y = x @ W^T
// (+ bias), x in bf16 or fp32, AVX2 + FMA. The layout is q8_0_rows.cpp's: W is [N][K/32] blocks
// of 34 bytes (a float16 scale d, then 32 int8 codes c; W[n, k] = d * c), so one packed copy
// serves this kernel and that GEMV.
//
// Where M is large the GEMM is compute-bound. The GEMV's exact integer sums (vpmaddwd, then per
// block of 32 a conversion and a scaled FMA for each pair of rows) ran SmolLM2's gate/up at M = 128
// in 2.8 ms on Zen 4 capped at AVX2, this kernel in 2.2 (~208 GFLOP/s on 2 cores). W is dequantized,
// 16 rows at a time, into a panel of fp32 columns (exact: an 11-bit scale times an 8-bit code), and
// the panel is multiplied by 6 rows of x at a time held in 12 accumulators: per k, two loads of
// the panel, six broadcasts of x and twelve FMAs. x enters as given (bf16 widened exactly), so the
// arithmetic is the fp32 reference's but for the order of the sums.
//
// A panel is 16 rows of W: with swiglu the packing puts 8 gate rows then the same 8 up rows in
// each (the tile order of avx2_common.h's emit_tile), and the panel's output is silu(gate) * up.
#include "avx2_common.h"

namespace {

using namespace zen_avx2;

constexpr int64_t kBlock = 32, kBlockBytes = 34, kPanel = 16, kRows = 6;

// v[j] = row j's 8 values -> v[i] = the 8 rows' value i.
inline void transpose8(__m256 (&v)[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(v[i], v[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(v[i], v[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    v[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// Rows n0 .. n0 + 8 * halves - 1 of W -> panel[k][16] (half h in lanes 8h .. 8h + 7), fp32.
void dequantize_panel(const uint8_t* w, int64_t n0, int halves, int64_t K, float* panel) {
  const int64_t blocks = K / kBlock, row_bytes = blocks * kBlockBytes;
  for (int h = 0; h < halves; ++h)
    for (int64_t b = 0; b < blocks; ++b) {
      __m256 d[8];
      const uint8_t* block[8];
      for (int j = 0; j < 8; ++j) {
        block[j] = w + (n0 + 8 * h + j) * row_bytes + b * kBlockBytes;
        d[j] = _mm256_set1_ps(_cvtsh_ss(*reinterpret_cast<const uint16_t*>(block[j])));
      }
      for (int q = 0; q < kBlock; q += 8) {  // 8 codes of 8 rows -> 8 lines of the panel
        __m256 v[8];
        for (int j = 0; j < 8; ++j)
          v[j] = _mm256_mul_ps(d[j], load8_int8(reinterpret_cast<const int8_t*>(block[j] + 2 + q)));
        transpose8(v);
        for (int i = 0; i < 8; ++i)
          _mm256_store_ps(panel + (b * kBlock + q + i) * kPanel + 8 * h, v[i]);
      }
    }
}

// y[m0 .. m0 + R - 1][the panel's columns]: acc[r][h] = sum_k x[m0 + r, k] * panel[k][8h .. 8h + 7]
// for R rows of x and H halves of the panel, then bias, swiglu or residual as stored. Every loop
// over r and h is unrolled: where one stayed a loop, GCC kept the accumulators in memory and
// stored all twelve every k, and the GEMM ran at half its FMA rate.
template <int R, int H>
void panel_rows(const float* x, int64_t m0, int64_t K, const float* panel, const float* bias, int64_t n0, void* y,
                int64_t n_out, bool swiglu, bool y_bf16, const float* residual) {
  __m256 acc[R][H];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < H; ++h)
      acc[r][h] = _mm256_setzero_ps();
  const float* xr = x + m0 * K;
  for (int64_t k = 0; k < K; ++k) {
    const __m256 w0 = _mm256_load_ps(panel + k * kPanel);
    const __m256 w1 = H == 2 ? _mm256_load_ps(panel + k * kPanel + 8) : w0;
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_broadcast_ss(xr + r * K + k);
      acc[r][0] = _mm256_fmadd_ps(xv, w0, acc[r][0]);
      if constexpr (H == 2)
        acc[r][1] = _mm256_fmadd_ps(xv, w1, acc[r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    __m256 out[2] = {acc[r][0], H == 2 ? acc[r][H - 1] : acc[r][0]};
    if (bias) {
      out[0] = _mm256_add_ps(out[0], _mm256_loadu_ps(bias + n0));
      if constexpr (H == 2)
        out[1] = _mm256_add_ps(out[1], _mm256_loadu_ps(bias + n0 + 8));
    }
    const int64_t row = (m0 + r) * n_out;
    if (H == 2 && swiglu) {  // output columns n0 / 2 .. n0 / 2 + 7
      store8(y, row + n0 / 2, _mm256_mul_ps(silu8(out[0]), out[1]), y_bf16);
      continue;
    }
    for (int h = 0; h < H; ++h) {
      const int64_t col = row + n0 + 8 * h;
      store8(y, col, residual ? _mm256_add_ps(out[h], _mm256_loadu_ps(residual + col)) : out[h], y_bf16);
    }
  }
}

template <int H>
void panel_all_rows(const float* x, int64_t M, int64_t K, const float* panel, const float* bias, int64_t n0, void* y,
                    int64_t n_out, bool swiglu, bool y_bf16, const float* residual) {
  int64_t m = 0;
  for (; m + kRows <= M; m += kRows)
    panel_rows<kRows, H>(x, m, K, panel, bias, n0, y, n_out, swiglu, y_bf16, residual);
  switch (M - m) {
    case 5: panel_rows<5, H>(x, m, K, panel, bias, n0, y, n_out, swiglu, y_bf16, residual); break;
    case 4: panel_rows<4, H>(x, m, K, panel, bias, n0, y, n_out, swiglu, y_bf16, residual); break;
    case 3: panel_rows<3, H>(x, m, K, panel, bias, n0, y, n_out, swiglu, y_bf16, residual); break;
    case 2: panel_rows<2, H>(x, m, K, panel, bias, n0, y, n_out, swiglu, y_bf16, residual); break;
    case 1: panel_rows<1, H>(x, m, K, panel, bias, n0, y, n_out, swiglu, y_bf16, residual); break;
    default: break;
  }
}

}  // namespace

// The entry of q8_0_rows.cpp, argument for argument (kernels/gguf_blocks.py calls both alike).
extern "C" void kernel(const void* x, const uint8_t* w, const float* bias, void* y, int64_t M, int64_t N, int64_t K,
                       int64_t x_bf16, int64_t y_bf16, int64_t has_bias, int64_t bits, int64_t swiglu,
                       const float* residual, int64_t has_residual) {
  (void)bits;
  static thread_local std::vector<float> x_buffer;
  const float* x32 = static_cast<const float*>(x);
  if (x_bf16) {  // widened once: every panel reads every row
    x_buffer.resize(M * K);
    float* out = x_buffer.data();
    const uint16_t* in = static_cast<const uint16_t*>(x);
    for (int64_t i = 0; i + 8 <= M * K; i += 8)
      _mm256_storeu_ps(out + i, load8(in, i, true));
    x32 = out;  // (K is a multiple of 32: no tail)
  }
  const int64_t n_out = swiglu ? N / 2 : N, panels = (N + kPanel - 1) / kPanel;
  const float* b = has_bias ? bias : nullptr;
  const float* res = has_residual ? residual : nullptr;
#pragma omp parallel
  {
    std::vector<float> storage(K * kPanel + 8);
    float* panel = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(storage.data()) + 31) & ~uintptr_t(31));
#pragma omp for schedule(static)
    for (int64_t p = 0; p < panels; ++p) {
      const int64_t n0 = p * kPanel;
      const int halves = N - n0 >= kPanel ? 2 : 1;  // N is a multiple of 8 (16 with swiglu)
      dequantize_panel(w, n0, halves, K, panel);
      if (halves == 2)
        panel_all_rows<2>(x32, M, K, panel, b, n0, y, n_out, swiglu, y_bf16, res);
      else
        panel_all_rows<1>(x32, M, K, panel, b, n0, y, n_out, swiglu, y_bf16, res);
    }
  }
}
