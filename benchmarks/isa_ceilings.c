// The arithmetic ceilings of one core, for benchmarks/isa_ceilings.py: each function runs `blocks`
// blocks of independent instructions of one kind (no dependency between them within a block, each
// accumulator carried across blocks: 12 of 16 ymm registers, 24 of 32 zmm, as many as cover the
// latency at two a cycle; vdpbf16ps in 12 registers ran at 0.9x zentorch's GEMM, Zen 5) and
// returns nothing; the caller times it. Inline assembly, so the compiler can neither drop nor
// reorder the work; the zmm functions name AVX-512 as their target only so zmm16 and up can be
// clobbered. A function is only called where the CPU has its instructions.
#include <stdint.h>

#define CLOBBER "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11"
#define ZMM_CLOBBER CLOBBER, "xmm12", "xmm13", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", \
  "xmm23", "xmm24", "xmm25"
#define TWELVE(op, reg)                                                                               \
  op " %%" reg "14, %%" reg "15, %%" reg "0\n\t" op " %%" reg "14, %%" reg "15, %%" reg "1\n\t"     \
  op " %%" reg "14, %%" reg "15, %%" reg "2\n\t" op " %%" reg "14, %%" reg "15, %%" reg "3\n\t"     \
  op " %%" reg "14, %%" reg "15, %%" reg "4\n\t" op " %%" reg "14, %%" reg "15, %%" reg "5\n\t"     \
  op " %%" reg "14, %%" reg "15, %%" reg "6\n\t" op " %%" reg "14, %%" reg "15, %%" reg "7\n\t"     \
  op " %%" reg "14, %%" reg "15, %%" reg "8\n\t" op " %%" reg "14, %%" reg "15, %%" reg "9\n\t"     \
  op " %%" reg "14, %%" reg "15, %%" reg "10\n\t" op " %%" reg "14, %%" reg "15, %%" reg "11\n\t"

// the same over zmm0-13 and zmm16-25 (zmm14 and 15 the sources)
#define TWENTY_FOUR(op)                                                                                \
  TWELVE(op, "zmm") op " %%zmm14, %%zmm15, %%zmm12\n\t" op " %%zmm14, %%zmm15, %%zmm13\n\t"            \
  op " %%zmm14, %%zmm15, %%zmm16\n\t" op " %%zmm14, %%zmm15, %%zmm17\n\t"                             \
  op " %%zmm14, %%zmm15, %%zmm18\n\t" op " %%zmm14, %%zmm15, %%zmm19\n\t"                             \
  op " %%zmm14, %%zmm15, %%zmm20\n\t" op " %%zmm14, %%zmm15, %%zmm21\n\t"                             \
  op " %%zmm14, %%zmm15, %%zmm22\n\t" op " %%zmm14, %%zmm15, %%zmm23\n\t"                             \
  op " %%zmm14, %%zmm15, %%zmm24\n\t" op " %%zmm14, %%zmm15, %%zmm25\n\t"

// 256-bit fp32 FMA (AVX2 + FMA): 8 multiply-adds
void fma_ymm(int64_t blocks) {
  for (int64_t i = 0; i < blocks; ++i) __asm__ volatile(TWELVE("vfmadd231ps", "ymm") ::: CLOBBER);
}

// AVX2's u8 x s8 step: vpmaddubsw (32 products summed in pairs to 16 bits) and vpmaddwd (pairs to
// 32 bits), alternating: 6 + 6 of them, 6 x 32 multiply-adds a block
void maddubs_madd_ymm(int64_t blocks) {
  for (int64_t i = 0; i < blocks; ++i)
    __asm__ volatile(
        "vpmaddubsw %%ymm14, %%ymm15, %%ymm0\n\t vpmaddwd %%ymm14, %%ymm15, %%ymm1\n\t"
        "vpmaddubsw %%ymm14, %%ymm15, %%ymm2\n\t vpmaddwd %%ymm14, %%ymm15, %%ymm3\n\t"
        "vpmaddubsw %%ymm14, %%ymm15, %%ymm4\n\t vpmaddwd %%ymm14, %%ymm15, %%ymm5\n\t"
        "vpmaddubsw %%ymm14, %%ymm15, %%ymm6\n\t vpmaddwd %%ymm14, %%ymm15, %%ymm7\n\t"
        "vpmaddubsw %%ymm14, %%ymm15, %%ymm8\n\t vpmaddwd %%ymm14, %%ymm15, %%ymm9\n\t"
        "vpmaddubsw %%ymm14, %%ymm15, %%ymm10\n\t vpmaddwd %%ymm14, %%ymm15, %%ymm11\n\t" ::: CLOBBER);
}

// AVX2's exact 16-bit step: vpmaddwd (two 16 x 16-bit products into 32 bits) and the vpaddd that
// accumulates it, 6 + 6: csrc/int8_gemm_avx2.cpp's inner loop, which nothing saturates
void madd_add_ymm(int64_t blocks) {
  for (int64_t i = 0; i < blocks; ++i)
    __asm__ volatile(
        "vpmaddwd %%ymm14, %%ymm15, %%ymm0\n\t vpaddd %%ymm0, %%ymm6, %%ymm6\n\t"
        "vpmaddwd %%ymm14, %%ymm15, %%ymm1\n\t vpaddd %%ymm1, %%ymm7, %%ymm7\n\t"
        "vpmaddwd %%ymm14, %%ymm15, %%ymm2\n\t vpaddd %%ymm2, %%ymm8, %%ymm8\n\t"
        "vpmaddwd %%ymm14, %%ymm15, %%ymm3\n\t vpaddd %%ymm3, %%ymm9, %%ymm9\n\t"
        "vpmaddwd %%ymm14, %%ymm15, %%ymm4\n\t vpaddd %%ymm4, %%ymm10, %%ymm10\n\t"
        "vpmaddwd %%ymm14, %%ymm15, %%ymm5\n\t vpaddd %%ymm5, %%ymm11, %%ymm11\n\t" ::: CLOBBER);
}

// AVX2 u8 x s8 products beside fp32 FMAs, alternating: whether they use different units
void maddubs_beside_fma_ymm(int64_t blocks) {
  for (int64_t i = 0; i < blocks; ++i)
    __asm__ volatile(
        "vpmaddubsw %%ymm14, %%ymm15, %%ymm0\n\t vfmadd231ps %%ymm14, %%ymm15, %%ymm1\n\t"
        "vpmaddubsw %%ymm14, %%ymm15, %%ymm2\n\t vfmadd231ps %%ymm14, %%ymm15, %%ymm3\n\t"
        "vpmaddubsw %%ymm14, %%ymm15, %%ymm4\n\t vfmadd231ps %%ymm14, %%ymm15, %%ymm5\n\t"
        "vpmaddubsw %%ymm14, %%ymm15, %%ymm6\n\t vfmadd231ps %%ymm14, %%ymm15, %%ymm7\n\t"
        "vpmaddubsw %%ymm14, %%ymm15, %%ymm8\n\t vfmadd231ps %%ymm14, %%ymm15, %%ymm9\n\t"
        "vpmaddubsw %%ymm14, %%ymm15, %%ymm10\n\t vfmadd231ps %%ymm14, %%ymm15, %%ymm11\n\t" ::: CLOBBER);
}

// AVX512-BF16, 24 a block: 16 fp32 lanes, each the sum of 2 bf16 products: 32 multiply-adds
__attribute__((target("avx512f"))) void dpbf16_zmm(int64_t blocks) {
  for (int64_t i = 0; i < blocks; ++i) __asm__ volatile(TWENTY_FOUR("vdpbf16ps") ::: ZMM_CLOBBER);
}

// AVX512-VNNI, 24 a block: 16 int32 lanes, each the sum of 4 u8 x s8 products: 64 multiply-adds
__attribute__((target("avx512f"))) void dpbusd_zmm(int64_t blocks) {
  for (int64_t i = 0; i < blocks; ++i) __asm__ volatile(TWENTY_FOUR("vpdpbusd") ::: ZMM_CLOBBER);
}
