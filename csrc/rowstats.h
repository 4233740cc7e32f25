#pragma once
#include "common.h"

float row_logsumexp(const float* x, int64_t n);
f32_array logsumexp_rows(f32_array x);
void softmax_rows_(f32_out x, f32_out lse);
f32_array top_p_threshold(f32_array probs, f32_array top_p, int iterations);
