// Attention of one query position over a KV cache (decode), called by zen::decode_attention
// (ops.cpp), which hands it q already scaled, in fp32, and takes its fp32 output.
//
// Reads K and V once per KV head for the whole group of query heads that share it (GQA), and only
// at positions some query of the group may see: a position whose additive mask is -inf for every
// query of the group is never read, and neither is anything after the last visible one (a static
// cache's unwritten tail). The positions are cut into chunks spread over the threads; each chunk
// keeps a running max, sum and weighted sum of V (fp32), and the chunks are combined per query
// head at the end. A query head that sees no position gets 0, as ATen's flash attention gives.
#include <omp.h>

// Inductor's flags turn GCC's loop vectorizer off (its own kernels vectorize by hand): these plain
// loops over D need it back, with the omp simd reductions allowed to reorder their sums
#pragma GCC optimize("tree-loop-vectorize")

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kChunk = 128;  // positions per work item

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename T>
inline float load(const T* p, int64_t i);

template <>
inline float load<float>(const float* p, int64_t i) {
  return p[i];
}

template <>
inline float load<uint16_t>(const uint16_t* p, int64_t i) {
  return bf16_to_float(p[i]);
}

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
      if (mask_at(mask, s, b, kvh * group + g, l - 1) != -std::numeric_limits<float>::infinity()) return l;
    }
  }
  return 0;
}

// partial[(g) * (D + 2)]: running max, sum of exp, then D weighted sums of V
template <typename T>
void attend_chunk(const float* q, const T* k, const T* v, const float* mask, const Shape& s, int64_t b, int64_t kvh,
                  int64_t l0, int64_t l1, float* partial) {
  const int64_t group = s.H / s.Hkv, D = s.D, stride = D + 2;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t g = 0; g < group; ++g) {
    partial[g * stride] = neg_inf;
    partial[g * stride + 1] = 0.0f;
    std::fill(partial + g * stride + 2, partial + (g + 1) * stride, 0.0f);
  }
  const T* kb = k + b * s.k_sb + kvh * s.k_sh;
  const T* vb = v + b * s.v_sb + kvh * s.v_sh;
  float row[512];  // K or V row as fp32 (D <= 512, checked by the op)
  for (int64_t l = l0; l < l1; ++l) {
    float bias[64];  // mask of each query of the group at l (group <= 64, checked by the op)
    bool any = false;
    for (int64_t g = 0; g < group; ++g) {
      bias[g] = mask_at(mask, s, b, kvh * group + g, l);
      any = any || bias[g] != neg_inf;
    }
    if (!any) continue;
    const T* kl = kb + l * s.k_sl;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) row[d] = load(kl, d);
    float weight[64];
    for (int64_t g = 0; g < group; ++g) {
      weight[g] = 0.0f;
      if (bias[g] == neg_inf) continue;
      const float* qg = q + (b * s.H + kvh * group + g) * D;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += qg[d] * row[d];
      const float score = dot + bias[g];
      float* p = partial + g * stride;
      if (score > p[0]) {  // a new running max: what was summed so far shrinks by exp(old - new)
        const float shrink = p[0] == neg_inf ? 0.0f : std::exp(p[0] - score);
        p[1] *= shrink;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) p[2 + d] *= shrink;
        p[0] = score;
      }
      weight[g] = std::exp(score - p[0]);
      p[1] += weight[g];
    }
    const T* vl = vb + l * s.v_sl;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) row[d] = load(vl, d);
    for (int64_t g = 0; g < group; ++g) {
      if (weight[g] == 0.0f) continue;
      float* acc = partial + g * stride + 2;
      const float w = weight[g];
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) acc[d] += w * row[d];
    }
  }
}

template <typename T>
void attend(const float* q, const T* k, const T* v, const float* mask, float* out, const Shape& s) {
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
    attend_chunk(q, k, v, mask, s, i / s.Hkv, i % s.Hkv, l0, l1, partials.data() + item * group * stride);
  }
  for (int64_t i = 0; i < s.B * s.Hkv; ++i) {
    const int64_t b = i / s.Hkv, kvh = i % s.Hkv;
    for (int64_t g = 0; g < group; ++g) {
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t item = first_item[i]; item < first_item[i + 1]; ++item) {
        top = std::max(top, partials[(item * group + g) * stride]);
      }
      float* o = out + (b * s.H + kvh * group + g) * D;
      std::fill(o, o + D, 0.0f);
      if (top == -std::numeric_limits<float>::infinity()) continue;  // sees nothing: 0
      float total = 0.0f;
      for (int64_t item = first_item[i]; item < first_item[i + 1]; ++item) {
        const float* p = partials.data() + (item * group + g) * stride;
        if (p[0] == -std::numeric_limits<float>::infinity()) continue;
        const float f = std::exp(p[0] - top);
        total += f * p[1];
        for (int64_t d = 0; d < D; ++d) o[d] += f * p[2 + d];
      }
      for (int64_t d = 0; d < D; ++d) o[d] /= total;
    }
  }
}

}  // namespace

// q: fp32 [B, H, D], scaled; k, v: [B, Hkv, L, D] (fp32, or bf16 when kv_bf16) with the strides
// given and D contiguous; mask: additive fp32, read at b * m_sb + h * m_sh + l * m_sl (0 strides
// broadcast), only if has_mask; out: fp32 [B, H, D].
extern "C" void kernel(const float* q, const void* k, const void* v, const float* mask, float* out, int64_t B,
                       int64_t H, int64_t Hkv, int64_t L, int64_t D, int64_t k_sb, int64_t k_sh, int64_t k_sl,
                       int64_t v_sb, int64_t v_sh, int64_t v_sl, int64_t m_sb, int64_t m_sh, int64_t m_sl,
                       int64_t has_mask, int64_t kv_bf16) {
  const Shape s{B, H, Hkv, L, D, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl, m_sb, m_sh, m_sl, has_mask != 0};
  if (kv_bf16) {
    attend(q, static_cast<const uint16_t*>(k), static_cast<const uint16_t*>(v), mask, out, s);
  } else {
    attend(q, static_cast<const float*>(k), static_cast<const float*>(v), mask, out, s);
  }
}
