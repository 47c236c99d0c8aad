// Exact int8 x int8 -> int32 GEMM with AVX2, for many rows of x (zen_a8w8_gemm_avx2, kernels/int8_rows.py):
// sums[m][n] = sum_k x[m][k] * w[n][k], x [M, K] and w [N, K] int8 with K contiguous (the model's
// own rows), sums [M, N] int32 contiguous.
//
// Why not torch._int_mm there: without VNNI, oneDNN's u8 x s8 GEMM multiplies with vpmaddubsw,
// which adds two byte products into 16 bits with saturation; x shifted to u8 (x + 128, up to 255)
// times w up to 127 overflows it: 15-49% of the int32 sums came out wrong on Gaussian int8 codes
// (Zen 5, oneDNN capped at AVX2; every one on uniform codes). Here both sides are widened to 16
// bits and multiplied by vpmaddwd, two exact 16 x 16-bit products into 32 bits: as many products
// an instruction as vpmaddubsw + vpmaddwd gave, no rounding nor saturation anywhere.
//
// The GotoBLAS loops: each thread a range of columns; for each block of kNc columns and kKc values
// of k, w's block is packed as 16-bit pairs (k, k + 1) of 16 columns at a time, [kKc / 2][16][2],
// and register tiles of kMr rows x 16 columns (12 accumulators) run over it, x widened to 16 bits
// once a call (both in memory of the call's own).
#include "avx2_common.h"

#include <algorithm>

namespace {

constexpr int kMr = 6;        // rows of a register tile
constexpr int kNr = 16;       // its columns: two vectors of 8 int32
constexpr int64_t kKc = 1024;  // values of k a packed block (even): 32 KB a 16-column panel
constexpr int64_t kNc = 256;   // columns a packed block: 512 KB of L2

// a tile's row: its 16 sums stored (first block of k) or added to what is there, `cols` of them
inline void store_tile_row(int32_t* out, __m256i lo, __m256i hi, int64_t cols, bool first) {
  if (cols == kNr) {
    __m256i* o = reinterpret_cast<__m256i*>(out);
    if (!first) {
      lo = _mm256_add_epi32(lo, _mm256_loadu_si256(o));
      hi = _mm256_add_epi32(hi, _mm256_loadu_si256(o + 1));
    }
    _mm256_storeu_si256(o, lo);
    _mm256_storeu_si256(o + 1, hi);
    return;
  }
  alignas(32) int32_t row[kNr];
  _mm256_store_si256(reinterpret_cast<__m256i*>(row), lo);
  _mm256_store_si256(reinterpret_cast<__m256i*>(row + 8), hi);
  for (int64_t j = 0; j < cols; ++j) out[j] = first ? row[j] : out[j] + row[j];
}

// tile[r][0 .. 16) (+)= sum over kpairs of x16[r] pairs . panel pairs; x16 rows lda apart (int16,
// even offsets), the panel [kpairs][16] of 32-bit pairs
template <int R>
[[gnu::noinline]] void tile(const int16_t* x16, int64_t lda, const int32_t* panel, int64_t kpairs, int32_t* sums, int64_t ldc,
                 int64_t cols, bool first) {
  // two named arrays, not one [R][2]: GCC kept that one on the stack, a store a product
  __m256i lo[R], hi[R];
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm256_setzero_si256();
  const int32_t* pairs = reinterpret_cast<const int32_t*>(x16);  // K2 even: each row's pairs 4-byte aligned
  const int64_t ld_pairs = lda / 2;
  for (int64_t p = 0; p < kpairs; ++p) {
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + p * kNr));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + p * kNr + 8));
    for (int r = 0; r < R; ++r) {
      const __m256i a = _mm256_set1_epi32(pairs[r * ld_pairs + p]);
      lo[r] = _mm256_add_epi32(lo[r], _mm256_madd_epi16(a, b0));
      hi[r] = _mm256_add_epi32(hi[r], _mm256_madd_epi16(a, b1));
    }
  }
  for (int r = 0; r < R; ++r) store_tile_row(sums + r * ldc, lo[r], hi[r], cols, first);
}

// A full tile, its 12 sums in registers: GCC's tile<6> kept six broadcasts, two rows of w and the
// sums live at once, more than AVX2's 16 registers, and moved sums to the stack and back each step
// of k (345-380 GFLOP/s against oneDNN's saturating 470-530 at llama1b's prefill shapes, Zen 5)
#define ZEN_ROW(at, lo, hi)                                                                     \
  "vpbroadcastd " at ", %%ymm14\n\t"                                                              \
  "vpmaddwd %%ymm12, %%ymm14, %%ymm15\n\t vpaddd %%ymm15, %[" #lo "], %[" #lo "]\n\t"           \
  "vpmaddwd %%ymm13, %%ymm14, %%ymm15\n\t vpaddd %%ymm15, %[" #hi "], %[" #hi "]\n\t"
template <>
[[gnu::noinline]] void tile<6>(const int16_t* x16, int64_t lda, const int32_t* panel, int64_t kpairs, int32_t* sums,
                               int64_t ldc, int64_t cols, bool first) {
  __m256i l0 = _mm256_setzero_si256(), h0 = l0, l1 = l0, h1 = l0, l2 = l0, h2 = l0, l3 = l0, h3 = l0, l4 = l0,
          h4 = l0, l5 = l0, h5 = l0;
  const int32_t* x = reinterpret_cast<const int32_t*>(x16);
  const int64_t row_bytes = lda * 2;  // rows 0-2 from x, 3-5 from three rows on
  for (int64_t p = 0; p < kpairs; ++p) {
    const int32_t *b = panel + p * kNr, *xa = x + p, *xb = x + 3 * (lda / 2) + p;
    __asm__("vmovdqu (%[b]), %%ymm12\n\t vmovdqu 32(%[b]), %%ymm13\n\t"
            ZEN_ROW("(%[xa])", l0, h0) ZEN_ROW("(%[xa],%[ld],1)", l1, h1) ZEN_ROW("(%[xa],%[ld],2)", l2, h2)
            ZEN_ROW("(%[xb])", l3, h3) ZEN_ROW("(%[xb],%[ld],1)", l4, h4) ZEN_ROW("(%[xb],%[ld],2)", l5, h5)
            : [l0] "+x"(l0), [h0] "+x"(h0), [l1] "+x"(l1), [h1] "+x"(h1), [l2] "+x"(l2), [h2] "+x"(h2),
              [l3] "+x"(l3), [h3] "+x"(h3), [l4] "+x"(l4), [h4] "+x"(h4), [l5] "+x"(l5), [h5] "+x"(h5)
            : [b] "r"(b), [xa] "r"(xa), [xb] "r"(xb), [ld] "r"(row_bytes)
            : "xmm12", "xmm13", "xmm14", "xmm15", "memory");
  }
  const __m256i lo[6] = {l0, l1, l2, l3, l4, l5}, hi[6] = {h0, h1, h2, h3, h4, h5};
  for (int r = 0; r < 6; ++r) store_tile_row(sums + r * ldc, lo[r], hi[r], cols, first);
}
#undef ZEN_ROW

// w's rows n0 .. n0 + cols, k0 .. k0 + kpairs * 2 (past K: 0) as panels of 16 columns, [panel][kpairs][16]
// 32-bit words, each the int16 pair (w[n][k], w[n][k + 1]); columns past `cols` 0
void pack_block(const int8_t* w, int64_t K, int64_t n0, int64_t cols, int64_t k0, int64_t kpairs, int32_t* packed) {
  const int64_t panels = (cols + kNr - 1) / kNr;
  for (int64_t q = 0; q < panels; ++q) {
    int32_t* panel = packed + q * kpairs * kNr;
    for (int64_t j = 0; j < kNr; ++j) {
      const int64_t n = q * kNr + j;
      if (n >= cols) {
        for (int64_t p = 0; p < kpairs; ++p) panel[p * kNr + j] = 0;
        continue;
      }
      const int8_t* row = w + (n0 + n) * K;
      int64_t p = 0;
      // 16 values (8 pairs) at a time: widened to 16 bits, each 32-bit lane a pair
      for (; k0 + 2 * p + 16 <= K && p + 8 <= kpairs; p += 8) {
        const __m256i pairs = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k0 + 2 * p)));
        alignas(32) int32_t words[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(words), pairs);
        for (int i = 0; i < 8; ++i) panel[(p + i) * kNr + j] = words[i];
      }
      for (; p < kpairs; ++p) {
        const int64_t k = k0 + 2 * p;
        const uint16_t lo = static_cast<uint16_t>(k < K ? row[k] : 0), hi = static_cast<uint16_t>(k + 1 < K ? row[k + 1] : 0);
        panel[p * kNr + j] = static_cast<int32_t>(static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16));
      }
    }
  }
}

}  // namespace

extern "C" void kernel(const int8_t* x, const int8_t* w, int32_t* sums, int64_t M, int64_t N, int64_t K,
                       int64_t threads) {
  const int64_t K2 = (K + 1) / 2 * 2;
  std::vector<int16_t> widened(M * K2);  // x in 16 bits, each row's pairs 4-byte aligned
  int16_t* x16 = widened.data();
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) x16[m * K2 + k] = x[m * K + k];
    if (K2 != K) x16[m * K2 + K] = 0;
  }
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
    // each thread its columns, in whole panels, and its own packed blocks
    const int64_t panels = (N + kNr - 1) / kNr;
    const int64_t c0 = std::min(N, panels * t / T * kNr), c1 = std::min(N, panels * (t + 1) / T * kNr);
    std::vector<int32_t> packed(kNc * kKc / 2);
    int32_t* block = packed.data();
    for (int64_t n0 = c0; n0 < c1; n0 += kNc) {
      const int64_t cols = std::min(kNc, c1 - n0);
      for (int64_t k0 = 0; k0 < K2; k0 += kKc) {
        const int64_t kpairs = std::min(kKc, K2 - k0) / 2;
        pack_block(w, K, n0, cols, k0, kpairs, block);
        for (int64_t m0 = 0; m0 < M; m0 += kMr) {
          zen_avx2::with_tile_rows(std::min<int64_t>(kMr, M - m0), [&](auto R) {
            for (int64_t j0 = 0; j0 < cols; j0 += kNr)
              tile<R()>(x16 + m0 * K2 + k0, K2, block + (j0 / kNr) * kpairs * kNr, kpairs, sums + m0 * N + n0 + j0, N,
                        std::min<int64_t>(kNr, cols - j0), k0 == 0);
          });
        }
      }
    }
  }
}
