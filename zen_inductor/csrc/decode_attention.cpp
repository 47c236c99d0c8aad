// Attention of one query position over a KV cache (decode), called by zen::decode_attention
// (ops.cpp), which hands it q in fp32 with the scale, and takes its fp32 output.
//
// Reads K and V once per KV head for the whole group of query heads that share it (GQA), and only
// at positions some query of the group may see: a position whose additive mask is -inf for every
// query of the group is never read, and neither is anything after the last visible one (a static
// cache's unwritten tail). The positions are cut into chunks spread over the threads. A chunk is
// three passes: the scores of every (query, position), then their exponentials eight positions
// at a time against the chunk's max (a running max rescaled at each position put a scalar exp
// on every position: 2.6x behind SDPA at 2048 positions), then the weighted sum of V. The chunks
// are combined per query head in fp32 at the end. A query head that sees no position gets 0, as
// ATen's flash attention gives.
#include "avx2_common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using namespace zen_avx2;

constexpr int64_t kChunk = 128;  // positions per work item
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Shape {
  int64_t B, H, Hkv, L, D;
  int64_t k_sb, k_sh, k_sl, v_sb, v_sh, v_sl, m_sb, m_sh, m_sl;
  bool has_mask;
};

inline float mask_at(const float* mask, const Shape& s, int64_t b, int64_t h, int64_t l) {
  return s.has_mask ? mask[b * s.m_sb + h * s.m_sh + l * s.m_sl] : 0.0f;
}

// one past the last position any query head of (b, kv head) may see
int64_t visible_end(const float* mask, const Shape& s, int64_t b, int64_t kvh) {
  if (!s.has_mask) return s.L;
  const int64_t group = s.H / s.Hkv;
  for (int64_t l = s.L; l > 0; --l) {
    for (int64_t g = 0; g < group; ++g) {
      if (mask_at(mask, s, b, kvh * group + g, l - 1) != kNegInf) return l;
    }
  }
  return 0;
}

// a row of K or V (D values, bf16 or fp32) as fp32
inline void load_row(const void* src, bool bf16, int64_t D, float* row) {
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) _mm256_storeu_ps(row + d, load8(src, d, bf16));
  for (; d < D; ++d) {
    if (bf16) {
      const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(src)[d]) << 16;
      std::memcpy(row + d, &bits, sizeof(float));
    } else {
      row[d] = static_cast<const float*>(src)[d];
    }
  }
}

inline float dot(const float* a, const float* b, int64_t D) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), _mm256_loadu_ps(b + d + 8), acc1);
  }
  for (; d + 8 <= D; d += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc0);
  float sum = hsum(_mm256_add_ps(acc0, acc1));
  for (; d < D; ++d) sum += a[d] * b[d];
  return sum;
}

inline void add_scaled(float* acc, float w, const float* row, int64_t D) {
  const __m256 wv = _mm256_set1_ps(w);
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(wv, _mm256_loadu_ps(row + d), _mm256_loadu_ps(acc + d)));
  for (; d < D; ++d) acc[d] += w * row[d];
}

// partial[g * (D + 2)]: the chunk's max score, sum of exp, then D weighted sums of V, for query g
// of the group; positions [l0, l1) of (b, kv head)
void attend_chunk(const float* q, const void* k, const void* v, bool kv_bf16, const float* mask, const Shape& s,
                  int64_t b, int64_t kvh, int64_t l0, int64_t l1, float* partial) {
  const int64_t group = s.H / s.Hkv, D = s.D, stride = D + 2, n = l1 - l0;
  const int64_t width = kv_bf16 ? 2 : 4;
  const char* kb = static_cast<const char*>(k) + (b * s.k_sb + kvh * s.k_sh) * width;
  const char* vb = static_cast<const char*>(v) + (b * s.v_sb + kvh * s.v_sh) * width;
  // scores, then weights, of query g at position l0 + i: [g * kChunk + i]; group <= 64 (the op checks)
  alignas(32) float weights[64 * kChunk];
  alignas(32) float row[512];  // D <= 512, checked by the op
  bool seen[kChunk] = {};  // some query of the group may see the position
  for (int64_t i = 0; i < n; ++i) {
    const int64_t l = l0 + i;
    float* column = weights + i;
    for (int64_t g = 0; g < group; ++g) {
      column[g * kChunk] = mask_at(mask, s, b, kvh * group + g, l);
      seen[i] = seen[i] || column[g * kChunk] != kNegInf;
    }
    if (!seen[i]) continue;
    load_row(kb + l * s.k_sl * width, kv_bf16, D, row);
    for (int64_t g = 0; g < group; ++g) {
      if (column[g * kChunk] != kNegInf) column[g * kChunk] += dot(q + (b * s.H + kvh * group + g) * D, row, D);
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    float* w = weights + g * kChunk;
    float* p = partial + g * stride;
    float top = kNegInf;
    for (int64_t i = 0; i < n; ++i) top = std::max(top, w[i]);
    p[0] = top;
    p[1] = 0.0f;
    std::fill(p + 2, p + stride, 0.0f);
    if (top == kNegInf) {
      std::fill(w, w + n, 0.0f);
      continue;
    }
    const __m256 topv = _mm256_set1_ps(top), neg_inf = _mm256_set1_ps(kNegInf);
    __m256 sum = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {  // a masked position weighs exactly 0 (exp8 clamps at e^-87)
      const __m256 score = _mm256_loadu_ps(w + i);
      const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(score, topv)), _mm256_cmp_ps(score, neg_inf, _CMP_NEQ_OQ));
      _mm256_storeu_ps(w + i, e);
      sum = _mm256_add_ps(sum, e);
    }
    p[1] = hsum(sum);
    for (; i < n; ++i) {
      w[i] = w[i] == kNegInf ? 0.0f : std::exp(w[i] - top);
      p[1] += w[i];
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    if (!seen[i]) continue;
    load_row(vb + (l0 + i) * s.v_sl * width, kv_bf16, D, row);
    for (int64_t g = 0; g < group; ++g) {
      const float w = weights[g * kChunk + i];
      if (w != 0.0f) add_scaled(partial + g * stride + 2, w, row, D);
    }
  }
}

void attend(const float* q_unscaled, float scale, const void* k, const void* v, bool kv_bf16, const float* mask, float* out,
            const Shape& s) {
  std::vector<float> q_scaled(s.B * s.H * s.D);
  for (size_t i = 0; i < q_scaled.size(); ++i) q_scaled[i] = q_unscaled[i] * scale;
  const float* q = q_scaled.data();
  const int64_t group = s.H / s.Hkv, D = s.D, stride = D + 2;
  // work items: (b, kv head, chunk of the visible positions)
  std::vector<int64_t> ends(s.B * s.Hkv), first_item(s.B * s.Hkv + 1, 0);
  for (int64_t i = 0; i < s.B * s.Hkv; ++i) {
    ends[i] = visible_end(mask, s, i / s.Hkv, i % s.Hkv);
    first_item[i + 1] = first_item[i] + std::max<int64_t>(1, (ends[i] + kChunk - 1) / kChunk);
  }
  const int64_t items = first_item.back();
  std::vector<float> partials(items * group * stride);
  int64_t positions = 0;
  for (int64_t e : ends) positions += e;
#pragma omp parallel for schedule(dynamic, 1) if (positions * group * D > 65536)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t i = std::upper_bound(first_item.begin(), first_item.end(), item) - first_item.begin() - 1;
    const int64_t l0 = (item - first_item[i]) * kChunk, l1 = std::min(ends[i], l0 + kChunk);
    attend_chunk(q, k, v, kv_bf16, mask, s, i / s.Hkv, i % s.Hkv, l0, l1, partials.data() + item * group * stride);
  }
  for (int64_t i = 0; i < s.B * s.Hkv; ++i) {
    const int64_t b = i / s.Hkv, kvh = i % s.Hkv;
    for (int64_t g = 0; g < group; ++g) {
      float top = kNegInf;
      for (int64_t item = first_item[i]; item < first_item[i + 1]; ++item) {
        top = std::max(top, partials[(item * group + g) * stride]);
      }
      float* o = out + (b * s.H + kvh * group + g) * D;
      std::fill(o, o + D, 0.0f);
      if (top == kNegInf) continue;  // sees nothing: 0
      float total = 0.0f;
      for (int64_t item = first_item[i]; item < first_item[i + 1]; ++item) {
        const float* p = partials.data() + (item * group + g) * stride;
        if (p[0] == kNegInf) continue;
        const float f = std::exp(p[0] - top);
        total += f * p[1];
        for (int64_t d = 0; d < D; ++d) o[d] += f * p[2 + d];
      }
      for (int64_t d = 0; d < D; ++d) o[d] /= total;
    }
  }
}

}  // namespace

// q: fp32 [B, H, D], multiplied by *scale as read; k, v: [B, Hkv, L, D] (fp32, or bf16 when kv_bf16) with the strides
// given and D contiguous; mask: additive fp32, read at b * m_sb + h * m_sh + l * m_sl (0 strides
// broadcast), only if has_mask; out: fp32 [B, H, D].
extern "C" void kernel(const float* q, const void* k, const void* v, const float* mask, float* out, const float* scale, int64_t B,
                       int64_t H, int64_t Hkv, int64_t L, int64_t D, int64_t k_sb, int64_t k_sh, int64_t k_sl,
                       int64_t v_sb, int64_t v_sh, int64_t v_sl, int64_t m_sb, int64_t m_sh, int64_t m_sl,
                       int64_t has_mask, int64_t kv_bf16) {
  const Shape s{B, H, Hkv, L, D, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl, m_sb, m_sh, m_sl, has_mask != 0};
  attend(q, *scale, k, v, kv_bf16 != 0, mask, out, s);
}
