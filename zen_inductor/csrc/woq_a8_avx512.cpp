// The weight-only linears of woq_avx512.h on x quantized to int8 per row and group (X8 there):
// the kernels zen_a8w4_avx512 and zen_a8w8_avx512, offered only under
// config.int8_activations_for_weight_only.
#include "woq_avx512.h"

extern "C" void kernel(const void* x, const uint8_t* w, const float* scale, const float* offset, const float* bias,
                       void* y, int64_t M, int64_t N, int64_t K, int64_t G, int64_t x_bf16, int64_t y_bf16,
                       int64_t has_bias, int64_t bits, int64_t grouped, int64_t swiglu, const float* residual,
                       int64_t has_residual) {
  woq_linear<true>(x, w, scale, offset, bias, y, M, N, K, G, x_bf16, y_bf16, has_bias, bits, grouped, swiglu,
                   residual, has_residual);
}
