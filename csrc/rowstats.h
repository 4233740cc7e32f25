#pragma once
#include "common.h"

float row_logsumexp(const float* x, int64_t n);
f32_array logsumexp_rows(f32_array x);
void softmax_rows_(f32_out x, f32_out lse);
f32_array top_p_threshold(f32_array probs, f32_array top_p, int iterations);
// One draw per row of exp(logprobs) [rows, V] (logprobs <= 0) by inverting its CDF at uniforms[row] in [0, 1).
i64_array sample_rows(f32_array logprobs, f32_array uniforms);
// Temperature + top-p (nucleus) sampling of each row of logits [rows, V] in one native pass per stage, never an
// [rows, V] probability tensor: writes the token drawn at uniforms[row], its log-prob under the raw logits and
// under the processed (tempered, truncated, renormalised) distribution.
void sample_nucleus(f32_array logits, f32_array inv_temp, f32_array top_p, f32_array uniforms, i64_array_out tokens,
                    f32_out raw_logprob, f32_out processed_logprob);
