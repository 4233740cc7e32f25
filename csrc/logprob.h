#pragma once
#include "common.h"

// Throws a ValueError naming the first label outside [0, vocab) that is not ignore_index.
void check_labels(const int64_t* labels, int64_t rows, int64_t vocab, int64_t ignore_index);
void logprob_forward(f32_array logits, i64_array labels, float inv_temp, int64_t ignore_index,
                     f32_out logp, f32_out lse, py::object entropy);
void logprob_backward(f32_out logits, i64_array labels, float inv_temp, f32_array lse, f32_array entropy,
                      f32_array grad_logp, f32_array grad_entropy);
void kl_forward(f32_array logits, f32_array ref_logits, float inv_temp, f32_out kl,
                f32_out lse, f32_out mean_diff);
void kl_backward(f32_out logits, f32_array ref_logits, float inv_temp, f32_array lse,
                 f32_array mean_diff, f32_array grad_kl);
