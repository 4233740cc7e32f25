#pragma once
#include "common.h"

float row_logsumexp(const float* x, int64_t n);
f32_array logsumexp_rows(f32_array x);
void softmax_rows_(f32_out x, f32_out lse);
f32_array top_p_threshold(f32_array probs, f32_array top_p, int iterations);
// One draw per row of exp(logprobs) [rows, V] (logprobs <= 0) by inverting its CDF at uniforms[row] in [0, 1).
i64_array sample_rows(f32_array logprobs, f32_array uniforms);
