// Decode attention, written once for a lane policy L (csrc/decode_attention.cpp: AVX2, 8 fp32 lanes;
// decode_attention_avx512.cpp: 16), each including this text with ZEN_ATTENTION_TARGET set to the
// ISA its functions are compiled for and ZEN_ATTENTION_LANES to its policy, which provides
//   V, W (lanes), zero(), set1(x), load(const float*), store(float*, V), fmadd(a, b, c),
//   load_kv(row, d, bf16): W values of a row of K or V from d on, widened from bf16 if asked,
//   fold8(V): a __m256 whose 8 lanes sum to the same as V's.
//
// K and V come as fp32, bf16, or int8 codes with one fp32 scale a (batch, KV head, position): an
// int8 row is widened to fp32 once a chunk, its scale applied as it is widened, and the passes
// below read the fp32 rows (the chunk's rows stay in L1/L2; memory gives one byte a value).
//
// Attention of one query position over a KV cache (decode), called by zen::decode_attention
// (ops.cpp), which hands it q in fp32 with the scale, and takes its fp32 output.
//
// Reads K and V once per KV head for the whole group of query heads that share it (GQA), and only
// at positions some query of the group may see: a position whose additive mask is -inf for every
// query of the group is never read, and neither is anything after the last visible one (a static
// cache's unwritten tail). The positions are cut into chunks spread over the threads. A chunk is
// three passes: the scores of every (query, position), eight positions at a time; their
// exponentials, eight at a time against the chunk's max (a running max rescaled at each position
// put a scalar exp on every position); then the weighted sum of V, per query, its sums held in
// registers across the chunk's positions. The chunks
// are combined per query head in fp32 at the end. A query head that sees no position gets 0, as
// ATen's flash attention gives.
#pragma once
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

// one value of a row of K or V (bf16 or fp32) as fp32
inline float value_at(const void* row, int64_t d, bool bf16) {
  if (!bf16) return static_cast<const float*>(row)[d];
  const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(row)[d]) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(float));
  return out;
}

// [sum(a0), ..., sum(a7)]: eight dot products finished at once (one horizontal sum a position was
// a chain of shuffles per score, and the scores pass ran at a third of its loads' pace)
inline __m256 sums8(const __m256* a) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// scores[i] += q . K[l0 + i] for eight positions, rows of K `row_bytes` apart
template <class L>
ZEN_ATTENTION_TARGET inline void scores8(const float* q, const char* k, int64_t row_bytes, bool bf16, int64_t D,
                                         float* scores) {
  typename L::V acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = L::zero();
  const int64_t DW = D / L::W * L::W;
  for (int64_t d = 0; d < DW; d += L::W) {
    const typename L::V qv = L::load(q + d);
    for (int j = 0; j < 8; ++j) acc[j] = L::fmadd(qv, L::load_kv(k + j * row_bytes, d, bf16), acc[j]);
  }
  __m256 folded[8];
  for (int j = 0; j < 8; ++j) folded[j] = L::fold8(acc[j]);
  _mm256_storeu_ps(scores, _mm256_add_ps(_mm256_loadu_ps(scores), sums8(folded)));
  for (int64_t d = DW; d < D; ++d)
    for (int j = 0; j < 8; ++j) scores[j] += q[d] * value_at(k + j * row_bytes, d, bf16);
}

// out[0 .. W T) += sum_i w[i] V[l0 + i][d0 .. d0 + W T): T vectors of sums held in registers over
// the positions (a sum kept in memory waited on its own store at every position)
template <class L, int T>
ZEN_ATTENTION_TARGET inline void weighted_rows(const float* w, const bool* seen, int64_t n, const char* v,
                                               int64_t row_bytes, bool bf16, int64_t d0, float* out) {
  typename L::V acc[T];
  for (int t = 0; t < T; ++t) acc[t] = L::load(out + L::W * t);
  for (int64_t i = 0; i < n; ++i) {
    if (!seen[i] || w[i] == 0.0f) continue;
    const typename L::V wv = L::set1(w[i]);
    const char* row = v + i * row_bytes;
    for (int t = 0; t < T; ++t) acc[t] = L::fmadd(wv, L::load_kv(row, d0 + L::W * t, bf16), acc[t]);
  }
  for (int t = 0; t < T; ++t) L::store(out + L::W * t, acc[t]);
}

// the seen rows of n bf16 rows (`row_bytes` apart, D values each) as fp32 rows of D in out
template <class L>
ZEN_ATTENTION_TARGET void widen_rows(const char* rows, int64_t row_bytes, const bool* seen, int64_t n, int64_t D,
                                     std::vector<float>& out) {
  out.resize(n * D);
  for (int64_t i = 0; i < n; ++i) {
    if (!seen[i]) continue;
    int64_t d = 0;
    for (; d + L::W <= D; d += L::W) L::store(&out[i * D + d], L::load_kv(rows + i * row_bytes, d, true));
    for (; d < D; ++d) out[i * D + d] = value_at(rows + i * row_bytes, d, true);
  }
}

enum class KvKind : int64_t { kFloat = 0, kBFloat16 = 1, kInt8 = 2 };

// the seen rows of n int8 rows (`row_bytes` apart, D codes each, row i's scale scales[i]) as fp32
// rows of D in out
ZEN_ATTENTION_TARGET inline void widen_int8_rows(const char* rows, int64_t row_bytes, const float* scales, const bool* seen,
                                                 int64_t n, int64_t D, std::vector<float>& out) {
  out.resize(n * D);
  for (int64_t i = 0; i < n; ++i) {
    if (!seen[i]) continue;
    const int8_t* row = reinterpret_cast<const int8_t*>(rows + i * row_bytes);
    const __m256 scale = _mm256_set1_ps(scales[i]);
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
      const __m256i codes = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + d)));
      _mm256_storeu_ps(&out[i * D + d], _mm256_mul_ps(_mm256_cvtepi32_ps(codes), scale));
    }
    for (; d < D; ++d) out[i * D + d] = static_cast<float>(row[d]) * scales[i];
  }
}

// partial[g * (D + 2)]: the chunk's max score, sum of exp, then D weighted sums of V, for query g
// of the group; positions [l0, l1) of (b, kv head)
template <class L>
ZEN_ATTENTION_TARGET void attend_chunk(const float* q, const void* k, const void* v, KvKind kind, const float* k_scale,
                                       const float* v_scale, const float* mask, const Shape& s, int64_t b, int64_t kvh,
                                       int64_t l0, int64_t l1, float* partial) {
  const int64_t group = s.H / s.Hkv, D = s.D, stride = D + 2, n = l1 - l0;
  bool kv_bf16 = kind == KvKind::kBFloat16;
  const int64_t width = kind == KvKind::kFloat ? 4 : kv_bf16 ? 2 : 1;
  int64_t k_row = s.k_sl * width, v_row = s.v_sl * width;
  const char* kb = static_cast<const char*>(k) + (b * s.k_sb + kvh * s.k_sh + l0 * s.k_sl) * width;
  const char* vb = static_cast<const char*>(v) + (b * s.v_sb + kvh * s.v_sh + l0 * s.v_sl) * width;
  // scores, then weights, of query g at position l0 + i: [g * kChunk + i]; group <= 64 (the op checks)
  alignas(32) float weights[64 * kChunk];
  bool seen[kChunk] = {};  // some query of the group may see the position
  for (int64_t g = 0; g < group; ++g) {
    if (g > 0 && s.m_sh == 0) {  // one mask for every head (transformers' is [B, 1, 1, L]): copied
      std::memcpy(weights + g * kChunk, weights, n * sizeof(float));
      continue;
    }
    for (int64_t i = 0; i < n; ++i) {
      weights[g * kChunk + i] = mask_at(mask, s, b, kvh * group + g, l0 + i);
      seen[i] = seen[i] || weights[g * kChunk + i] != kNegInf;
    }
  }
  // bf16 K and V widened once a chunk, not once per query of the group (the passes below read each
  // row group times: widening there made bf16 slower than fp32 at half the bytes)
  static thread_local std::vector<float> k32, v32;
  const bool widened = (kv_bf16 && L::kWidenOnce) || kind == KvKind::kInt8;
  if (kind == KvKind::kInt8) {  // scales: [B, Hkv, L], packed
    const int64_t first = (b * s.Hkv + kvh) * s.L + l0;
    widen_int8_rows(kb, k_row, k_scale + first, seen, n, D, k32);
    widen_int8_rows(vb, v_row, v_scale + first, seen, n, D, v32);
  } else if (widened) {
    widen_rows<L>(kb, k_row, seen, n, D, k32);
    widen_rows<L>(vb, v_row, seen, n, D, v32);
  }
  if (widened) {
    kb = reinterpret_cast<const char*>(k32.data());
    vb = reinterpret_cast<const char*>(v32.data());
    k_row = v_row = D * 4;
    kv_bf16 = false;
  }
  for (int64_t i = 0; i < n; i += 8) {
    const int64_t count = std::min<int64_t>(8, n - i);
    if (std::none_of(seen + i, seen + i + count, [](bool x) { return x; })) continue;
    // V's rows are read after every score of the chunk: asked for now, they arrive meanwhile
    for (int64_t j = 0; j < count && !widened; ++j)
      for (int64_t byte = 0; byte < D * width; byte += 64) _mm_prefetch(vb + (i + j) * v_row + byte, _MM_HINT_T0);
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = q + (b * s.H + kvh * group + g) * D;
      float* scores = weights + g * kChunk + i;
      if (count == 8) {  // -inf + a finite dot stays -inf
        scores8<L>(qg, kb + i * k_row, k_row, kv_bf16, D, scores);
        continue;
      }
      for (int64_t j = 0; j < count; ++j) {
        if (scores[j] == kNegInf) continue;
        float sum = 0.0f;
        for (int64_t d = 0; d < D; ++d) sum += qg[d] * value_at(kb + (i + j) * k_row, d, kv_bf16);
        scores[j] += sum;
      }
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    float* w = weights + g * kChunk;
    float* p = partial + g * stride;
    __m256 top8 = _mm256_set1_ps(kNegInf);  // eight running maxima: one was a chain of dependent max
    int64_t i8 = 0;
    for (; i8 + 8 <= n; i8 += 8) top8 = _mm256_max_ps(top8, _mm256_loadu_ps(w + i8));
    alignas(32) float tops[8];
    _mm256_store_ps(tops, top8);
    float top = *std::max_element(tops, tops + 8);
    for (; i8 < n; ++i8) top = std::max(top, w[i8]);
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
    float* out = p + 2;
    int64_t d = 0;
    for (; d + 64 <= D; d += 64) weighted_rows<L, 64 / L::W>(w, seen, n, vb, v_row, kv_bf16, d, out + d);
    for (; d + 2 * L::W <= D; d += 2 * L::W) weighted_rows<L, 2>(w, seen, n, vb, v_row, kv_bf16, d, out + d);
    for (; d + L::W <= D; d += L::W) weighted_rows<L, 1>(w, seen, n, vb, v_row, kv_bf16, d, out + d);
    for (; d < D; ++d)
      for (int64_t i2 = 0; i2 < n; ++i2)
        if (seen[i2]) out[d] += w[i2] * value_at(vb + i2 * v_row, d, kv_bf16);
  }
}

template <class L>
void attend(const float* q_unscaled, float scale, const void* k, const void* v, KvKind kind, const float* k_scale,
            const float* v_scale, const float* mask, float* out, const Shape& s) {
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
    attend_chunk<L>(q, k, v, kind, k_scale, v_scale, mask, s, i / s.Hkv, i % s.Hkv, l0, l1,
                    partials.data() + item * group * stride);
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

// q: fp32 [B, H, D], multiplied by *scale as read; k, v: [B, Hkv, L, D] with the strides given and D
// contiguous, of kv_kind (0 fp32, 1 bf16, 2 int8 codes whose values are code * k_scale / v_scale,
// fp32 [B, Hkv, L] packed; the scales are read only for int8); mask: additive fp32, read at
// b * m_sb + h * m_sh + l * m_sl (0 strides broadcast), only if has_mask; out: fp32 [B, H, D].
// Computed with the including file's lanes.
extern "C" void kernel(const float* q, const void* k, const void* v, const float* mask, float* out, const float* scale, int64_t B,
                       int64_t H, int64_t Hkv, int64_t L, int64_t D, int64_t k_sb, int64_t k_sh, int64_t k_sl,
                       int64_t v_sb, int64_t v_sh, int64_t v_sl, int64_t m_sb, int64_t m_sh, int64_t m_sl,
                       int64_t has_mask, int64_t kv_kind, const float* k_scale, const float* v_scale) {
  const Shape s{B, H, Hkv, L, D, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl, m_sb, m_sh, m_sl, has_mask != 0};
  attend<ZEN_ATTENTION_LANES>(q, *scale, k, v, static_cast<KvKind>(kv_kind), k_scale, v_scale, mask, out, s);
}
