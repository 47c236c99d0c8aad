// The weight-only linears of woq_avx512.h on x quantized to int8 per row and group: the kernels
// zen_a8w4_avx512 and zen_a8w8_avx512, offered only under config.int8_activations_for_weight_only.
#define ZEN_WOQ_X8 1
#include "woq_avx512.h"
