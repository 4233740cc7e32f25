#pragma once
#include "common.h"

// out = grad_out^T x: the weight gradient of y = x W^T, in float32. grad_out [N, O] and x [N, I] bfloat16 (as int16
// views), out [O, I] float32, written in place; O and I multiples of 32.
void linear_weight_grad_bf16(py::array grad_out, py::array x, py::array out);
