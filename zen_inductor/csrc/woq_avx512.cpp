// The weight-only linears of woq_avx512.h on x as it comes (bf16 or fp32, split into two signed
// bytes a value): exact integer sums, the weight's own arithmetic.
#include "woq_avx512.h"

extern "C" void kernel(const void* x, const uint8_t* w, const float* scale, const float* offset, const float* bias,
                       void* y, int64_t M, int64_t N, int64_t K, int64_t G, int64_t x_bf16, int64_t y_bf16,
                       int64_t has_bias, int64_t bits, int64_t grouped, int64_t swiglu, const float* residual,
                       int64_t has_residual) {
  woq_linear<false>(x, w, scale, offset, bias, y, M, N, K, G, x_bf16, y_bf16, has_bias, bits, grouped, swiglu,
                    residual, has_residual);
}
