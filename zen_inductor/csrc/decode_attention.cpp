// Decode attention with AVX2 and FMA (8 fp32 lanes): the algorithm is decode_attention.h's.
#include "avx2_common.h"

namespace {

struct Lanes8 {
  using V = __m256;
  static constexpr int64_t W = 8;
  static constexpr bool kWidenOnce = true;  // per-query passes: a bf16 row widened per query cost more than a copy
  static constexpr int kGroupPositions = 2;
  // V's sums over 32 values for groups of 2-3 (8-12 sums of 8 lanes, beside a row's 4 vectors, in
  // the 16 registers; a group of 4 would need 16 sums): half the passes over V's rows, each loading
  // their weights again. Zen 5 capped at AVX2, bf16 at 4k: SmolLM2's groups of 3 82 -> 77 us a
  // call, groups of 2 104 -> 94
  template <int G>
  static constexpr int64_t group_slice() { return G <= 3 ? 32 : 16; }
  // Zen 4 capped at AVX2, llama1b's shape at 4096: 32 ahead made fp32 K 10-15% slower, bf16 K 6%
  // faster (270-277 against 286-302 us a call)
  static constexpr int64_t kAheadRows = 0;
  static constexpr int64_t kAheadNarrowRows = 32;
  // Zen 5 capped at AVX2, 4k: this build is bound by its instructions more than by the memory, and
  // asking for the next chunk's K made llama1b's shape 12% slower in bf16 and fp32
  static constexpr bool kNextChunkAhead = false;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V load_kv(const void* row, int64_t d, int kind) {
    if (kind == zen_avx2::kInt8) return zen_avx2::load8_int8(static_cast<const int8_t*>(row) + d);
    return zen_avx2::load8(row, d, kind == zen_avx2::kBf16);
  }
  static __m256 fold8(V v) { return v; }
};

}  // namespace

#define ZEN_ATTENTION_TARGET
#define ZEN_ATTENTION_LANES Lanes8
#include "decode_attention.h"
