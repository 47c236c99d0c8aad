// A prompt's attention under an additive mask with AVX2 and FMA (zen::prefill_attention where
// zentorch's SDPA cannot run): flash attention, blocks of kQueryBlock queries of one head against
// blocks of kKeyBlock keys, fp32 arithmetic, a running max and sum a query row.
//
// Why not ATen's flash attention, block by block as attention.py did: capped at AVX2 on Zen 5 it
// ran llama1b's causal prompt of 2048 at ~136 GFLOP/s of the two cores' 283 (fp32 FMAs,
// benchmarks/results/isa-ceilings-zen5.md), each block of its keys a call into a BLAS GEMM. Here
// K and V are widened to fp32 once a call into a layout the two inner loops read straight (K
// transposed a block of keys, V as rows), shared by the query heads of a KV head (GQA), and the
// blocks of scores and of V's sums are register tiles of 6 rows x 16 columns (12 accumulators).
//
// q [B, H, L, D], k and v [B, Hkv, S, D] (D contiguous, a multiple of 16, at most 256), of one
// dtype, fp32 or bf16; mask additive (fp32 or bf16), read at b * m_sb + h * m_sh + l * m_sl + s
// (0 strides broadcast), where has_mask; causal: query l sees keys 0 .. l (ATen's is_causal,
// top-left), else every key the mask lets it (all without one); extents[i]: one past the last key
// any query of block i (kQueryBlock queries) may see (attention.py's mask_extent); out [B, H, L, D]
// contiguous in q's dtype; scale: one fp32. A query that sees no key gets 0, as ATen's flash attention gives.
#include "avx2_common.h"

#include <algorithm>
#include <limits>

using namespace zen_avx2;

namespace {

constexpr int64_t kQueryBlock = 128;  // attention.py's QUERY_BLOCK: extents are given a block of it
constexpr int64_t kKeyBlock = 64;
constexpr int kRows = 6;  // rows of a register tile; its columns: 16 (two vectors)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Shape {
  int64_t B, H, Hkv, L, S, D;
  int64_t q_sb, q_sh, q_sl, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl, m_sb, m_sh, m_sl;
  bool has_mask, causal, bf16, mask_bf16;
};

inline float scalar_at(const void* p, int64_t i, bool bf16) {
  if (!bf16) return static_cast<const float*>(p)[i];
  const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(p)[i]) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(float));
  return out;
}

// acc[r] += sum_d a[r * lda + d] * b[d * ldb + (0 .. 16)] for R rows: the scores (a: the scaled
// queries, b: K transposed) and V's sums (a: the weights, b: V's rows)
template <int R>
inline void tile(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t depth, __m256 (&acc)[kRows][2]) {
  for (int64_t d = 0; d < depth; ++d) {
    const __m256 b0 = _mm256_loadu_ps(b + d * ldb), b1 = _mm256_loadu_ps(b + d * ldb + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 x = _mm256_broadcast_ss(a + r * lda + d);
      acc[r][0] = _mm256_fmadd_ps(x, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(x, b1, acc[r][1]);
    }
  }
}

// scores[r][0 .. kKeyBlock) = q[r] . K[j] for the rows of a query block, K transposed (kt: [D][kKeyBlock])
template <int R>
inline void score_rows(const float* q, int64_t D, const float* kt, float* scores) {
  for (int64_t c = 0; c < kKeyBlock; c += 16) {
    __m256 acc[kRows][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    tile<R>(q, D, kt + c, kKeyBlock, D, acc);
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(scores + r * kKeyBlock + c, acc[r][0]);
      _mm256_storeu_ps(scores + r * kKeyBlock + c + 8, acc[r][1]);
    }
  }
}

// o[r] = o[r] * alpha[r] + sum_j w[r][j] V[j] over `keys` keys, V's rows fp32 D apart
template <int R>
inline void add_weighted_rows(const float* w, const float* v, int64_t keys, int64_t D, const float* alpha, float* o) {
  for (int64_t c = 0; c < D; c += 16) {
    __m256 acc[kRows][2];
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_set1_ps(alpha[r]);
      acc[r][0] = _mm256_mul_ps(_mm256_loadu_ps(o + r * D + c), a);
      acc[r][1] = _mm256_mul_ps(_mm256_loadu_ps(o + r * D + c + 8), a);
    }
    tile<R>(w, kKeyBlock, v + c, D, keys, acc);
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(o + r * D + c, acc[r][0]);
      _mm256_storeu_ps(o + r * D + c + 8, acc[r][1]);
    }
  }
}

// f(std::integral_constant<int, R>{}) for R = rows, 1 .. kRows
// One row of a block's scores (n keys from s0, the rest of the row's kKeyBlock past S) becomes its
// weights exp(score - max) against the row's running max m, whose sum l is rescaled to it; returns
// the rescale of the row's earlier sums (1 where nothing was seen yet or the max held)
inline float softmax_step(float* row, const void* mask_row, bool mask_bf16, int64_t n, float& m, float& l) {
  int64_t j = 0;
  if (mask_row) {
    for (; j + 8 <= n; j += 8)
      _mm256_storeu_ps(row + j, _mm256_add_ps(_mm256_loadu_ps(row + j), load8(mask_row, j, mask_bf16)));
    for (; j < n; ++j) row[j] += scalar_at(mask_row, j, mask_bf16);
  }
  for (j = n; j < kKeyBlock; ++j) row[j] = kNegInf;
  __m256 top8 = _mm256_set1_ps(kNegInf);
  for (j = 0; j < kKeyBlock; j += 8) top8 = _mm256_max_ps(top8, _mm256_loadu_ps(row + j));
  const float top = std::max(m, hmax(top8));
  if (top == kNegInf) {  // nothing seen so far: the row weighs nothing
    std::fill(row, row + kKeyBlock, 0.0f);
    return 1.0f;
  }
  const __m256 topv = _mm256_set1_ps(top), neg_inf = _mm256_set1_ps(kNegInf);
  __m256 sum = _mm256_setzero_ps();
  for (j = 0; j < kKeyBlock; j += 8) {  // a masked key weighs exactly 0 (exp8 clamps at e^-87)
    const __m256 s = _mm256_loadu_ps(row + j);
    const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(s, topv)), _mm256_cmp_ps(s, neg_inf, _CMP_NEQ_OQ));
    _mm256_storeu_ps(row + j, e);
    sum = _mm256_add_ps(sum, e);
  }
  const float alpha = m == kNegInf ? 0.0f : std::exp(m - top);
  l = l * alpha + hsum(sum);
  m = top;
  return alpha;
}

// K of every (b, KV head) transposed a block of keys, [B * Hkv][blocks][D][kKeyBlock], and V as fp32
// rows, [B * Hkv][blocks * kKeyBlock][D]; keys past S are 0
void widen_kv(const void* k, const void* v, const Shape& s, int64_t blocks, float* kt, float* v32) {
  const int64_t per_head = blocks * kKeyBlock * s.D;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t bh = 0; bh < s.B * s.Hkv; ++bh) {
    for (int64_t kb = 0; kb < blocks; ++kb) {
      const int64_t b = bh / s.Hkv, h = bh % s.Hkv;
      float* kt_block = kt + bh * per_head + kb * s.D * kKeyBlock;
      float* v_block = v32 + bh * per_head + kb * kKeyBlock * s.D;
      for (int64_t j = 0; j < kKeyBlock; ++j) {
        const int64_t key = kb * kKeyBlock + j;
        float* v_row = v_block + j * s.D;
        if (key >= s.S) {
          std::fill(v_row, v_row + s.D, 0.0f);
          for (int64_t d = 0; d < s.D; ++d) kt_block[d * kKeyBlock + j] = 0.0f;
          continue;
        }
        const int64_t k_at = b * s.k_sb + h * s.k_sh + key * s.k_sl, v_at = b * s.v_sb + h * s.v_sh + key * s.v_sl;
        for (int64_t d = 0; d < s.D; d += 8) _mm256_storeu_ps(v_row + d, load8(v, v_at + d, s.bf16));
        for (int64_t d = 0; d < s.D; ++d) kt_block[d * kKeyBlock + j] = scalar_at(k, k_at + d, s.bf16);
      }
    }
  }
}

// the queries [l0, l0 + rows) of (b, h) against keys [0, extent)
void attend_block(const void* q, const float* kt, const float* v32, const void* mask, void* out, float scale,
                  const Shape& s, int64_t b, int64_t h, int64_t l0, int64_t rows, int64_t extent, int64_t blocks) {
  const int64_t D = s.D;
  static thread_local std::vector<float> qs, o, scores;
  qs.resize(kQueryBlock * D);
  o.assign(kQueryBlock * D, 0.0f);
  scores.resize(kQueryBlock * kKeyBlock);
  float m[kQueryBlock], l[kQueryBlock], alpha[kQueryBlock];
  std::fill(m, m + rows, kNegInf);
  std::fill(l, l + rows, 0.0f);
  const __m256 scale8 = _mm256_set1_ps(scale);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t at = b * s.q_sb + h * s.q_sh + (l0 + r) * s.q_sl;
    for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(&qs[r * D + d], _mm256_mul_ps(load8(q, at + d, s.bf16), scale8));
  }
  const int64_t bh = b * s.Hkv + h / (s.H / s.Hkv), per_head = blocks * kKeyBlock * D;
  const int64_t mask_width = s.mask_bf16 ? 2 : 4;
  for (int64_t kb = 0; kb * kKeyBlock < extent; ++kb) {
    const int64_t s0 = kb * kKeyBlock, n = std::min(kKeyBlock, s.S - s0);
    const float* kt_block = kt + bh * per_head + kb * D * kKeyBlock;
    const float* v_block = v32 + bh * per_head + s0 * D;
    for (int64_t r0 = 0; r0 < rows; r0 += kRows)
      zen_avx2::with_tile_rows(std::min<int64_t>(kRows, rows - r0), [&](auto R) {
        score_rows<R()>(&qs[r0 * D], D, kt_block, &scores[r0 * kKeyBlock]);
      });
    for (int64_t r = 0; r < rows; ++r) {
      const char* mask_row = s.has_mask ? static_cast<const char*>(mask) +
                                              (b * s.m_sb + h * s.m_sh + (l0 + r) * s.m_sl + s0) * mask_width
                                        : nullptr;
      // causal (top-left, as ATen's is_causal): query l sees keys 0 .. l
      const int64_t seen = s.causal ? std::clamp<int64_t>(l0 + r - s0 + 1, 0, n) : n;
      alpha[r] = softmax_step(&scores[r * kKeyBlock], mask_row, s.mask_bf16, seen, m[r], l[r]);
    }
    for (int64_t r0 = 0; r0 < rows; r0 += kRows)
      zen_avx2::with_tile_rows(std::min<int64_t>(kRows, rows - r0), [&](auto R) {
        add_weighted_rows<R()>(&scores[r0 * kKeyBlock], v_block, n, D, alpha + r0, &o[r0 * D]);
      });
  }
  const int64_t out_at = ((b * s.H + h) * s.L + l0) * D;
  for (int64_t r = 0; r < rows; ++r) {
    const __m256 inv = _mm256_set1_ps(l[r] > 0.0f ? 1.0f / l[r] : 0.0f);
    for (int64_t d = 0; d < D; d += 8) store8(out, out_at + r * D + d, _mm256_mul_ps(_mm256_loadu_ps(&o[r * D + d]), inv), s.bf16);
  }
}

}  // namespace

extern "C" void kernel(const void* q, const void* k, const void* v, const void* mask, void* out, const int64_t* extents,
                       int64_t B, int64_t H, int64_t Hkv, int64_t L, int64_t S, int64_t D,
                       int64_t q_sb, int64_t q_sh, int64_t q_sl, int64_t k_sb, int64_t k_sh, int64_t k_sl,
                       int64_t v_sb, int64_t v_sh, int64_t v_sl, int64_t m_sb, int64_t m_sh, int64_t m_sl,
                       int64_t has_mask, int64_t causal, int64_t bf16, int64_t mask_bf16, const float* scale) {
  const Shape s{B, H, Hkv, L, S, D, q_sb, q_sh, q_sl, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl, m_sb, m_sh, m_sl,
                has_mask != 0, causal != 0, bf16 != 0, mask_bf16 != 0};
  const int64_t query_blocks = (L + kQueryBlock - 1) / kQueryBlock;
  const int64_t extent = *std::max_element(extents, extents + query_blocks);
  const int64_t blocks = (std::min(extent, S) + kKeyBlock - 1) / kKeyBlock;
  std::vector<float> kt(B * Hkv * blocks * kKeyBlock * D), v32(kt.size());
  widen_kv(k, v, s, blocks, kt.data(), v32.data());
  // the longest blocks first (under a causal mask, the last queries), so the threads end together
  const int64_t items = B * H * query_blocks;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t qb = query_blocks - 1 - item / (B * H), bh = item % (B * H);
    const int64_t l0 = qb * kQueryBlock, rows = std::min(kQueryBlock, L - l0);
    attend_block(q, kt.data(), v32.data(), mask, out, *scale, s, bh / H, bh % H, l0, rows,
                 std::min(extents[qb], S), blocks);
  }
}
