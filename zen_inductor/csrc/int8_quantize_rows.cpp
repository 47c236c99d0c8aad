// x [M, K] to int8 codes and one fp32 scale a row (int8_row_quantize.h), rows split across
// threads: the int8 x of aten_int_mm_da8's prefill GEMM in one pass over x. ATen's ops made an
// fp32 copy and passed over it five times (abs, amax, div, round, clamp, cast): ~75 ms for a
// 2048 x 8192 bf16 x on two Zen 4 cores, about as long as the _int_mm it fed, and fp32
// temporaries of 4x x's elements.
#include "int8_row_quantize.h"

using namespace zen_avx2;

extern "C" void kernel(const void* x, int8_t* xq, float* scale, int64_t M, int64_t K, int64_t x_bf16) {
#pragma omp parallel for schedule(static)
  for (int64_t m = 0; m < M; ++m)
    quantize_row(x, m, K, x_bf16, xq + m * K, scale + m);
}
