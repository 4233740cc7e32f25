#pragma once
#include <optional>

#include "common.h"

// out = x W^T (+ bias) in float32 for the few rows of a decode step: x [M, K], weight [N, K], bias [N], out [M, N]
// written in place; K a multiple of 8. AVX2 + FMA (checked at run time: the module imports everywhere).
void linear_f32(f32_array x, f32_array weight, std::optional<f32_array> bias, f32_out out);
bool linear_f32_available();
// The same on raw, already checked buffers; accumulate: out += x W^T (+ bias) (a residual sum in place).
void linear_f32_rows(const float* x, int64_t M, int64_t K, const float* w, const float* b, int64_t N, float* y,
                     bool accumulate);
