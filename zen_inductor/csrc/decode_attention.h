// Decode attention, written once for a lane policy L (csrc/decode_attention.cpp: AVX2, 8 fp32 lanes;
// decode_attention_avx512.cpp: 16), each including this text with ZEN_ATTENTION_TARGET set to the
// ISA its functions are compiled for and ZEN_ATTENTION_LANES to its policy, which provides
//   V, W (lanes), zero(), set1(x), load(const float*), store(float*, V), mul(a, b), fmadd(a, b, c),
//   load_kv(row, d, kind): W values of a row of K or V from d on, as fp32 from fp32, bf16 or int8
//   codes (kind: kFp32, kBf16, kInt8), fold8(V): a __m256 whose 8 lanes sum to the same as V's,
//   kWidenOnce: whether narrow rows are widened to fp32 once a chunk (else as each pass reads them)
//   where the group's queries are read one by one; kGroupPositions, group_slice<G>(): see
//   grouped_lanes;
//   kAheadRows, kAheadNarrowRows: how many positions ahead the scores ask for K's rows, fp32 and
//   narrow (0: never); kNextChunkAhead: whether the V sums of a chunk ask for the next chunk's K.
//
// K and V come as fp32, bf16, or int8 codes with one fp32 scale a (batch, KV head, position). An
// int8 row's scale is applied to what its codes gave: to a score after the dot product, to a
// position's weight before V's sum; or, widened once a chunk, as the row is widened.
//
// Attention of one query position over a KV cache (decode), called by zen::decode_attention
// (ops.cpp), which hands it q in fp32 with the scale, and takes its fp32 output.
//
// Reads K and V once per KV head for the whole group of query heads that share it (GQA), and only
// at positions some query of the group may see: a position whose additive mask is -inf for every
// query of the group is never read, and neither is anything after the last visible one (a static
// cache's unwritten tail). The positions are cut into chunks, each thread a run of them. A chunk is
// three passes: the scores of every (query, position), eight positions at a time; their
// exponentials, eight at a time against the chunk's max (a running max rescaled at each position
// put a scalar exp on every position); then the weighted sum of V, its sums held in registers
// across the chunk's positions; the scores and V's sums for all queries of a group of 2-4 at
// once (grouped_lanes), else per query. The chunks
// are combined per query head in fp32 at the end. A query head that sees no position gets 0, as
// ATen's flash attention gives.
#pragma once
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using namespace zen_avx2;

// positions per work item: at most kChunk (a query's row of weights), at least kMinChunk, about four
// items a thread between. Items of 128 at a 4k context (256 a llama1b call) spent ~30% of the call
// on what each item costs whatever its length (the mask's read, max, exp and V's sums started
// over, the partials merged).
constexpr int64_t kChunk = 1024, kMinChunk = 128;
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

// bytes of one value of a row of K or V of `kind`
constexpr int64_t kind_bytes(int kind) { return kind == kFp32 ? 4 : kind == kBf16 ? 2 : 1; }

// one value of a row of K or V (fp32, bf16 or an int8 code) as fp32
inline float value_at(const void* row, int64_t d, int kind) {
  if (kind == kInt8) return static_cast<float>(static_cast<const int8_t*>(row)[d]);
  if (kind == kFp32) return static_cast<const float*>(row)[d];
  const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(row)[d]) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(float));
  return out;
}

// scores[i] += q . K[l0 + i] for eight positions, rows of K `row_bytes` apart (int8 codes: times
// row_scales[i])
template <class L>
ZEN_ATTENTION_TARGET inline void scores8(const float* q, const char* k, int64_t row_bytes, int kind, const float* row_scales,
                                         int64_t D, float* scores) {
  typename L::V acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = L::zero();
  const int64_t DW = D / L::W * L::W;
  for (int64_t d = 0; d < DW; d += L::W) {
    const typename L::V qv = L::load(q + d);
    for (int j = 0; j < 8; ++j) acc[j] = L::fmadd(qv, L::load_kv(k + j * row_bytes, d, kind), acc[j]);
  }
  __m256 folded[8];
  for (int j = 0; j < 8; ++j) folded[j] = L::fold8(acc[j]);
  // eight dot products finished at once by reduce8 (one sum across lanes a position was a chain of
  // shuffles per score, and the scores pass ran at a third of its loads' pace)
  __m256 dots = reduce8(folded);
  alignas(32) float tail[8] = {};
  for (int64_t d = DW; d < D; ++d)
    for (int j = 0; j < 8; ++j) tail[j] += q[d] * value_at(k + j * row_bytes, d, kind);
  dots = _mm256_add_ps(dots, _mm256_load_ps(tail));
  if (kind == kInt8) dots = _mm256_mul_ps(dots, _mm256_loadu_ps(row_scales));
  _mm256_storeu_ps(scores, _mm256_add_ps(_mm256_loadu_ps(scores), dots));
}

// out[0 .. W T) += sum_i w[i] V[l0 + i][d0 .. d0 + W T): T vectors of sums held in registers over
// the positions (a sum kept in memory waited on its own store at every position)
template <class L, int T>
ZEN_ATTENTION_TARGET inline void weighted_rows(const float* w, const bool* seen, int64_t n, const char* v,
                                               int64_t row_bytes, int kind, int64_t d0, float* out) {
  typename L::V acc[T];
  for (int t = 0; t < T; ++t) acc[t] = L::load(out + L::W * t);
  for (int64_t i = 0; i < n; ++i) {
    if (!seen[i] || w[i] == 0.0f) continue;
    const typename L::V wv = L::set1(w[i]);
    const char* row = v + i * row_bytes;
    for (int t = 0; t < T; ++t) acc[t] = L::fmadd(wv, L::load_kv(row, d0 + L::W * t, kind), acc[t]);
  }
  for (int t = 0; t < T; ++t) L::store(out + L::W * t, acc[t]);
}

// scores[g * kChunk + j] += q_g . K[j] for each query g of the group (rows of q, D apart), one query
// at a time, positions j < count (8: in vectors; -inf + a finite dot stays -inf)
template <class L>
ZEN_ATTENTION_TARGET inline void scores_each(const float* q, const char* k, int64_t row_bytes, int kind,
                                             const float* row_scales, int64_t D, int64_t group, int64_t count,
                                             float* scores) {
  for (int64_t g = 0; g < group; ++g) {
    const float* qg = q + g * D;
    float* row = scores + g * kChunk;
    if (count == 8) {
      scores8<L>(qg, k, row_bytes, kind, row_scales, D, row);
      continue;
    }
    for (int64_t j = 0; j < count; ++j) {
      if (row[j] == kNegInf) continue;
      float sum = 0.0f;
      for (int64_t d = 0; d < D; ++d) sum += qg[d] * value_at(k + j * row_bytes, d, kind);
      row[j] += kind == kInt8 ? sum * row_scales[j] : sum;
    }
  }
}

// out[0 .. D) += sum_i w[i] V[i] for one query: weighted_rows over 64 values at a time, then 2W, W, 1
template <class L>
ZEN_ATTENTION_TARGET inline void weighted_sums(const float* w, const bool* seen, int64_t n, const char* v,
                                               int64_t row_bytes, int kind, int64_t D, float* out) {
  int64_t d = 0;
  for (; d + 64 <= D; d += 64) weighted_rows<L, 64 / L::W>(w, seen, n, v, row_bytes, kind, d, out + d);
  for (; d + 2 * L::W <= D; d += 2 * L::W) weighted_rows<L, 2>(w, seen, n, v, row_bytes, kind, d, out + d);
  for (; d + L::W <= D; d += L::W) weighted_rows<L, 1>(w, seen, n, v, row_bytes, kind, d, out + d);
  for (; d < D; ++d)
    for (int64_t i = 0; i < n; ++i)
      if (seen[i]) out[d] += w[i] * value_at(v + i * row_bytes, d, kind);
}

// Every query of a GQA group at once, where the group holds 2-4 queries of D a multiple of 64: each
// row of K and V is loaded and widened once for the queries that share it, not once per query.
// scores8 and weighted_rows per query widened each bf16 row four times for llama1b's groups and
// left the AVX-512 build at 41-55% of the read bandwidth at 4k. The lanes set how much stays in
// registers: L::kGroupPositions positions' scores for the group, V's sums over L::group_slice<G>()
// values (AVX-512: 4 and 64, 16 sums of 16 lanes; AVX2: 2, and 32 for groups of 2-3, 16 for 4, in
// its 16 registers).
constexpr bool grouped_lanes(int64_t group, int64_t D) { return group >= 2 && group <= 4 && D % 64 == 0; }

// f(std::integral_constant<int, G>{}) for a group of G = 2, 3 or 4 queries (grouped_lanes holds)
template <class F>
inline void with_group(int64_t group, F&& f) {
  if (group == 2) f(std::integral_constant<int, 2>{});
  else if (group == 3) f(std::integral_constant<int, 3>{});
  else f(std::integral_constant<int, 4>{});
}

// scores[g * kChunk + p] += q_g . K[p] for the G queries (rows of q, D apart) and P positions; int8
// codes times row_scales[p]
template <class L, int G, int P>
ZEN_ATTENTION_TARGET inline void scores_grouped(const float* q, const char* k, int64_t row_bytes, int kind,
                                                const float* row_scales, int64_t D, float* scores) {
  typename L::V acc[P * G];
  for (int j = 0; j < P * G; ++j) acc[j] = L::zero();
  for (int64_t d = 0; d < D; d += L::W) {
    typename L::V qv[G];
    for (int g = 0; g < G; ++g) qv[g] = L::load(q + g * D + d);
    for (int p = 0; p < P; ++p) {
      const typename L::V kv = L::load_kv(k + p * row_bytes, d, kind);
      for (int g = 0; g < G; ++g) acc[p * G + g] = L::fmadd(qv[g], kv, acc[p * G + g]);
    }
  }
  // the sums in query-major order, so each query's P scores are added as one vector (a scalar
  // add a score, times an int8 scale, held ~10% of an int8 call's samples at 4k; 3% faster)
  constexpr int kPadded = (P * G + 7) / 8 * 8;
  __m256 folded[kPadded];
  for (int j = 0; j < kPadded; ++j) folded[j] = j < P * G ? L::fold8(acc[(j % P) * G + j / P]) : _mm256_setzero_ps();
  alignas(32) float dots[kPadded];
  for (int j = 0; j < kPadded; j += 8) _mm256_store_ps(dots + j, reduce8(folded + j));
  for (int g = 0; g < G; ++g) {
    float* row = scores + g * kChunk;
    if constexpr (P == 4) {
      __m128 four = _mm_load_ps(dots + g * P);
      if (kind == kInt8) four = _mm_mul_ps(four, _mm_loadu_ps(row_scales));
      _mm_storeu_ps(row, _mm_add_ps(_mm_loadu_ps(row), four));
    } else {
      for (int p = 0; p < P; ++p) row[p] += kind == kInt8 ? dots[g * P + p] * row_scales[p] : dots[g * P + p];
    }
  }
}

// `count` rows of `bytes` bytes, `row_bytes` apart, asked for into the cache level Hint; rows one
// after another (a contiguous cache) as one run of lines. Always inlined: GCC takes a function of
// prefetches alone for one without effects, and where it kept one out of line it dropped the calls
// (no prefetch left in the built library)
template <int Hint>
[[gnu::always_inline]] inline void ask_for_rows(const char* rows, int64_t count, int64_t row_bytes, int64_t bytes) {
  if (row_bytes == bytes) {
    for (int64_t byte = 0; byte < count * bytes; byte += 64) _mm_prefetch(rows + byte, static_cast<_mm_hint>(Hint));
    return;
  }
  for (int64_t j = 0; j < count; ++j)
    for (int64_t byte = 0; byte < bytes; byte += 64)
      _mm_prefetch(rows + j * row_bytes + byte, static_cast<_mm_hint>(Hint));
}

// rows a pass asks for into L2 as it goes, one with each of its first n rows: the K of the thread's
// next work item while this one's V sums are taken (the lanes' kNextChunkAhead)
struct RowsAhead {
  const char* rows = nullptr;
  int64_t n = 0, row_bytes = 0, bytes = 0;
};

// out[g * out_stride + (0 .. S)] += sum_i w[g * kChunk + i] V[i][d0 .. d0 + S) for the G queries,
// S = L::group_slice<G>()
template <class L, int G>
ZEN_ATTENTION_TARGET inline void weighted_rows_grouped(const float* w, const bool* seen, int64_t n, const char* v,
                                                       int64_t row_bytes, int kind, int64_t d0, float* out,
                                                       int64_t out_stride, const RowsAhead& ahead) {
  constexpr int T = L::template group_slice<G>() / L::W;
  typename L::V acc[G][T];
  for (int g = 0; g < G; ++g)
    for (int t = 0; t < T; ++t) acc[g][t] = L::load(out + g * out_stride + L::W * t);
  for (int64_t i = 0; i < n; ++i) {
    if (i < ahead.n) ask_for_rows<_MM_HINT_T1>(ahead.rows + i * ahead.row_bytes, 1, ahead.row_bytes, ahead.bytes);
    if (!seen[i]) continue;
    const char* row = v + i * row_bytes;
    typename L::V vv[T];
    for (int t = 0; t < T; ++t) vv[t] = L::load_kv(row, d0 + L::W * t, kind);
    for (int g = 0; g < G; ++g) {
      const typename L::V wv = L::set1(w[g * kChunk + i]);
      for (int t = 0; t < T; ++t) acc[g][t] = L::fmadd(wv, vv[t], acc[g][t]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int t = 0; t < T; ++t) L::store(out + g * out_stride + L::W * t, acc[g][t]);
}

// the seen rows of n bf16 or int8 rows (`kind`; `row_bytes` apart, D values each) as fp32 rows of D
// in out; an int8 row i times its scale scales[i] (scales: int8 only)
template <class L>
ZEN_ATTENTION_TARGET void widen_rows(const char* rows, int64_t row_bytes, int kind, const float* scales, const bool* seen,
                                     int64_t n, int64_t D, std::vector<float>& out) {
  out.resize(n * D);
  for (int64_t i = 0; i < n; ++i) {
    if (!seen[i]) continue;
    const char* row = rows + i * row_bytes;
    const float scale = kind == kInt8 ? scales[i] : 1.0f;
    const typename L::V scale_v = L::set1(scale);
    int64_t d = 0;
    for (; d + L::W <= D; d += L::W) L::store(&out[i * D + d], L::mul(L::load_kv(row, d, kind), scale_v));
    for (; d < D; ++d) out[i * D + d] = value_at(row, d, kind) * scale;
  }
}

// row g of weights (kChunk apart): the additive mask of query g of (b, kv head) at positions l0 ..
// l0 + n; seen[i]: some query of the group may see position l0 + i
inline void mask_rows(const float* mask, const Shape& s, int64_t b, int64_t kvh, int64_t l0, int64_t n, float* weights,
                      bool* seen) {
  const int64_t group = s.H / s.Hkv;
  for (int64_t g = 0; g < group; ++g) {
    float* row = weights + g * kChunk;
    if (g > 0 && s.m_sh == 0) {  // one mask for every head (transformers' is [B, 1, 1, L]): copied
      std::memcpy(row, weights, n * sizeof(float));
      continue;
    }
    if (s.has_mask && s.m_sl == 1) {  // a row of the mask as it lies
      std::memcpy(row, mask + b * s.m_sb + (kvh * group + g) * s.m_sh + l0, n * sizeof(float));
    } else {
      for (int64_t i = 0; i < n; ++i) row[i] = mask_at(mask, s, b, kvh * group + g, l0 + i);
    }
    for (int64_t i = 0; i < n; ++i) seen[i] = seen[i] || row[i] != kNegInf;
  }
}

// The n scores w of one query become exp(score - max) in place, p[0] the max and p[1] their sum;
// false (w all 0) where no position is seen
ZEN_ATTENTION_TARGET inline bool exponentials(float* w, int64_t n, float* p) {
  __m256 top8 = _mm256_set1_ps(kNegInf);  // eight running maxima: one was a chain of dependent max
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) top8 = _mm256_max_ps(top8, _mm256_loadu_ps(w + i));
  alignas(32) float tops[8];
  _mm256_store_ps(tops, top8);
  float top = *std::max_element(tops, tops + 8);
  for (; i < n; ++i) top = std::max(top, w[i]);
  p[0] = top;
  p[1] = 0.0f;
  if (top == kNegInf) {
    std::fill(w, w + n, 0.0f);
    return false;
  }
  const __m256 topv = _mm256_set1_ps(top), neg_inf = _mm256_set1_ps(kNegInf);
  __m256 sum = _mm256_setzero_ps();
  for (i = 0; i + 8 <= n; i += 8) {  // a masked position weighs exactly 0 (exp8 clamps at e^-87)
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
  return true;
}

// w[i] *= scales[i]: an int8 position's weight times its V row's scale. In vectors: the scalar
// loop (w and scales may alias, for the compiler) waited on each scale's load (llama1b's shape at
// 4k: 178-181 us a call against 192-218).
template <class L>
ZEN_ATTENTION_TARGET inline void scale_weights(float* w, const float* scales, int64_t n) {
  int64_t i = 0;
  for (; i + L::W <= n; i += L::W) L::store(w + i, L::mul(L::load(w + i), L::load(scales + i)));
  for (; i < n; ++i) w[i] *= scales[i];
}

// partial[g * (D + 2)]: the chunk's max score, sum of exp, then D weighted sums of V, for query g
// of the group; positions [l0, l1) of (b, kv head)
template <class L>
ZEN_ATTENTION_TARGET void attend_chunk(const float* q, const void* k, const void* v, int kind, const float* k_scale,
                                       const float* v_scale, const float* mask, const Shape& s, int64_t b, int64_t kvh,
                                       int64_t l0, int64_t l1, const RowsAhead& next_k, float* partial) {
  const int64_t group = s.H / s.Hkv, D = s.D, stride = D + 2, n = l1 - l0;
  const int64_t width = kind_bytes(kind);
  int64_t k_row = s.k_sl * width, v_row = s.v_sl * width;
  const char* kb = static_cast<const char*>(k) + (b * s.k_sb + kvh * s.k_sh + l0 * s.k_sl) * width;
  const char* vb = static_cast<const char*>(v) + (b * s.v_sb + kvh * s.v_sh + l0 * s.v_sl) * width;
  // int8: the chunk's scales, [B, Hkv, L] packed
  const float* k_scales = kind == kInt8 ? k_scale + (b * s.Hkv + kvh) * s.L + l0 : nullptr;
  const float* v_scales = kind == kInt8 ? v_scale + (b * s.Hkv + kvh) * s.L + l0 : nullptr;
  // scores, then weights, of query g at position l0 + i: [g * kChunk + i]
  static thread_local std::vector<float> weights_rows;
  weights_rows.resize(group * kChunk);
  float* weights = weights_rows.data();
  bool seen[kChunk] = {};  // some query of the group may see the position
  mask_rows(mask, s, b, kvh, l0, n, weights, seen);
  // narrow K and V widened once a chunk, not once per query of the group, where the lanes ask (the
  // passes below read each row group times: on AVX2 widening there made bf16 slower than fp32 at
  // half the bytes)
  static thread_local std::vector<float> k32, v32;
  const bool grouped = grouped_lanes(group, D);
  const bool widened = kind != kFp32 && L::kWidenOnce && !grouped;
  if (widened) {
    widen_rows<L>(kb, k_row, kind, k_scales, seen, n, D, k32);
    widen_rows<L>(vb, v_row, kind, v_scales, seen, n, D, v32);
    kb = reinterpret_cast<const char*>(k32.data());
    vb = reinterpret_cast<const char*>(v32.data());
    k_row = v_row = D * 4;
    kind = kFp32;
  }
  for (int64_t i = 0; i < n; i += 8) {
    const int64_t count = std::min<int64_t>(8, n - i);
    if (std::none_of(seen + i, seen + i + count, [](bool x) { return x; })) continue;
    // V's rows are read after every score of the chunk: asked for now, they arrive meanwhile, into
    // L2 (a chunk's rows, up to 256 KB, did not stay in L1 until then)
    if (!widened) ask_for_rows<_MM_HINT_T1>(vb + i * v_row, count, v_row, D * width);
    // K's rows some positions on (the lane policy's), into L1: the hardware prefetcher stops at
    // each 4 KB page (32 positions of bf16 K), and the scores waited on K's loads
    const int64_t ahead = widened ? 0 : kind == kFp32 ? L::kAheadRows : L::kAheadNarrowRows;
    if (ahead && i + ahead < n)
      ask_for_rows<_MM_HINT_T0>(kb + (i + ahead) * k_row, std::min<int64_t>(8, n - i - ahead), k_row, D * width);
    // the scores of 8 positions at a time; an int8 position's scale is padded to 8 for the tail
    alignas(32) float row_scales[8] = {};
    if (kind == kInt8) std::copy(k_scales + i, k_scales + std::min<int64_t>(i + 8, n), row_scales);
    if (grouped && count == 8) {
      const float* q_group = q + (b * s.H + kvh * group) * D;
      with_group(group, [&](auto G) ZEN_ATTENTION_TARGET {
        for (int64_t j = 0; j < 8; j += L::kGroupPositions)
          scores_grouped<L, G(), L::kGroupPositions>(q_group, kb + (i + j) * k_row, k_row, kind, row_scales + j, D,
                                                     weights + i + j);
      });
      continue;
    }
    scores_each<L>(q + (b * s.H + kvh * group) * D, kb + i * k_row, k_row, kind, row_scales, D, group, count,
                   weights + i);
  }
  for (int64_t g = 0; g < group; ++g) {
    float* w = weights + g * kChunk;
    float* p = partial + g * stride;
    std::fill(p + 2, p + stride, 0.0f);
    if (!exponentials(w, n, p)) continue;
    if (kind == kInt8) scale_weights<L>(w, v_scales, n);  // V's sums take codes
    if (grouped) continue;  // V's sums for the whole group, below
    weighted_sums<L>(w, seen, n, vb, v_row, kind, D, p + 2);
  }
  if (grouped)
    with_group(group, [&](auto G) ZEN_ATTENTION_TARGET {
      for (int64_t d0 = 0; d0 < D; d0 += L::template group_slice<G()>())
        weighted_rows_grouped<L, G()>(weights, seen, n, vb, v_row, kind, d0, partial + 2 + d0, stride,
                                      d0 == 0 ? next_k : RowsAhead{});
    });
}

template <class L>
void attend(const float* q_unscaled, float scale, const void* k, const void* v, int kind, const float* k_scale,
            const float* v_scale, const float* mask, float* out, const Shape& s) {
  std::vector<float> q_scaled(s.B * s.H * s.D);
  for (size_t i = 0; i < q_scaled.size(); ++i) q_scaled[i] = q_unscaled[i] * scale;
  const float* q = q_scaled.data();
  const int64_t group = s.H / s.Hkv, D = s.D, stride = D + 2;
  // work items: (b, kv head, chunk of the visible positions)
  std::vector<int64_t> ends(s.B * s.Hkv), first_item(s.B * s.Hkv + 1, 0);
  int64_t positions = 0;
  for (int64_t i = 0; i < s.B * s.Hkv; ++i) {
    ends[i] = visible_end(mask, s, i / s.Hkv, i % s.Hkv);
    positions += ends[i];
  }
  const int64_t per_thread = positions / (4 * std::max(1, omp_get_max_threads()));
  const int64_t chunk = std::clamp<int64_t>((per_thread + 63) / 64 * 64, kMinChunk, kChunk);
  for (int64_t i = 0; i < s.B * s.Hkv; ++i)
    first_item[i + 1] = first_item[i] + std::max<int64_t>(1, (ends[i] + chunk - 1) / chunk);
  const int64_t items = first_item.back();
  std::vector<float> partials(items * group * stride);
  // item -> (b * Hkv + kv head, first position, end)
  auto span = [&](int64_t item) {
    const int64_t i = std::upper_bound(first_item.begin(), first_item.end(), item) - first_item.begin() - 1;
    const int64_t l0 = (item - first_item[i]) * chunk;
    return std::array<int64_t, 3>{i, l0, std::min(ends[i], l0 + chunk)};
  };
  const int64_t width = kind_bytes(kind);
  // each thread a run of consecutive items, so the item after this one is known (its K is asked
  // for ahead where the lanes say); on AVX2 the runs were also 2-6% faster than items handed out
  // one by one (Zen 5 capped at AVX2, 4k)
  const int threads = positions * group * D > 65536 ? std::max(1, omp_get_max_threads()) : 1;
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), T = omp_get_num_threads(), last = items * (t + 1) / T;
    for (int64_t item = items * t / T; item < last; ++item) {
      const auto [i, l0, l1] = span(item);
      RowsAhead next_k;
      if (L::kNextChunkAhead && item + 1 < last) {
        const auto [ni, n0, n1] = span(item + 1);
        const int64_t offset = (ni / s.Hkv) * s.k_sb + (ni % s.Hkv) * s.k_sh + n0 * s.k_sl;
        next_k = {static_cast<const char*>(k) + offset * width, n1 - n0, s.k_sl * width, D * width};
      }
      attend_chunk<L>(q, k, v, kind, k_scale, v_scale, mask, s, i / s.Hkv, i % s.Hkv, l0, l1, next_k,
                      partials.data() + item * group * stride);
    }
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
  attend<ZEN_ATTENTION_LANES>(q, *scale, k, v, static_cast<int>(kv_kind), k_scale, v_scale, mask, out, s);
}
