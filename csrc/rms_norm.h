#pragma once
#include "common.h"

// x [rows, d] float32 or bfloat16 bits; weight [d] float32; y like x's shape, float32 or bfloat16 bits.
void rms_norm_forward(py::array x, f32_array weight, float eps, py::array y, f32_out rstd);
void rms_norm_backward(py::array x, f32_array weight, f32_array rstd, py::array grad_y, py::array grad_x,
                       f32_out grad_weight);
// The forward on raw buffers, serially (for kernels that normalise their input first: the same bits).
void rms_norm_rows(FloatOrBf16 x, const float* weight, float eps, int64_t rows, int64_t d, void* y, bool y_bf16,
                   float* rstd);
