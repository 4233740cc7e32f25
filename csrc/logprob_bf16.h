#pragma once
#include "common.h"

// bf16 tensors cross the boundary as int16 views (numpy has no bfloat16); outputs are written in place.
using bf16_array = py::array_t<int16_t, 0>;

bool bf16_kernels_available();  // AVX512-BF16 (VDPBF16PS); AMX-BF16 tiles too where amx_available()
bool amx_available();
bool bf16_kernels_preferred();  // AMX, or VDPBF16PS on a CPU that issues it at full rate (AMD)
void logprob_forward_bf16(bf16_array hidden, bf16_array weight, py::object bias, i64_array labels, float inv_temp,
                          int64_t ignore_index, f32_out logp, f32_out lse, py::object entropy);
void logprob_backward_bf16(bf16_array hidden, bf16_array weight, py::object bias, i64_array labels, float inv_temp,
                           f32_array lse, f32_array entropy, f32_array grad_logp, f32_array grad_entropy,
                           py::object grad_hidden, py::object grad_weight, py::object grad_bias);
void kl_forward_bf16(bf16_array hidden, bf16_array weight, py::object bias, bf16_array ref_hidden,
                     bf16_array ref_weight, py::object ref_bias, float inv_temp, f32_out kl, f32_out lse,
                     f32_out mean_diff);
void kl_backward_bf16(bf16_array hidden, bf16_array weight, py::object bias, bf16_array ref_hidden,
                      bf16_array ref_weight, py::object ref_bias, float inv_temp, f32_array lse, f32_array mean_diff,
                      f32_array grad_kl, py::object grad_hidden, py::object grad_weight, py::object grad_bias);
