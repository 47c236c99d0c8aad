// Decode attention with AVX-512 (16 fp32 lanes): the algorithm is decode_attention.h's. Twice the
// lanes of the AVX2 build for the same loads: with bf16 K and V that build was bound by its FMAs
// (9-12 GB/s, behind ATen's SDPA; benchmarks/results/decode-attention.md).
#include "avx512_common.h"

namespace {

struct Lanes16 {
  using V = __m512;
  static constexpr int64_t W = 16;
  static constexpr bool kWidenOnce = false;
  static constexpr int kGroupPositions = 4;
  template <int G>
  static constexpr int64_t group_slice() { return 64; }
  // Zen 4, llama1b's and SmolLM2's shapes at 4096: fp32 K 10-25% faster, bf16 3-12% (16 and 64
  // ahead: less)
  static constexpr int64_t kAheadRows = 32;  // fp32 K
  static constexpr int64_t kAheadNarrowRows = 32;  // bf16 and int8 K
  // the next chunk's K asked for while a chunk's V sums are taken from L2, when the memory sat
  // idle (a chunk's K and V come in during its scores pass; a llama1b bf16 call at 4k took ~150 us
  // with K and V in L3, ~205-230 from memory): Zen 5 at 2-4k, fp32 and bf16 3-22% faster
  static constexpr bool kNextChunkAhead = true;
  ZEN_AVX512 static V zero() { return _mm512_setzero_ps(); }
  ZEN_AVX512 static V set1(float x) { return _mm512_set1_ps(x); }
  ZEN_AVX512 static V load(const float* p) { return _mm512_loadu_ps(p); }
  ZEN_AVX512 static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  ZEN_AVX512 static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  ZEN_AVX512 static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  ZEN_AVX512 static V load_kv(const void* row, int64_t d, int kind) {
    if (kind == zen_avx2::kInt8) {
      const __m128i codes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(row) + d));
      return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes));
    }
    if (kind == zen_avx2::kFp32) return _mm512_loadu_ps(static_cast<const float*>(row) + d);
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(row) + d));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  ZEN_AVX512 static __m256 fold8(V v) {
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  }
};

}  // namespace

#define ZEN_ATTENTION_TARGET ZEN_AVX512
#define ZEN_ATTENTION_LANES Lanes16
#include "decode_attention.h"
