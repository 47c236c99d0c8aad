// The weight-only linears of woq_avx512.h on x as it comes (bf16 or fp32, split into two signed
// bytes a value): exact integer sums, the weight's own arithmetic.
#include "woq_avx512.h"
