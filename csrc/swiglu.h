#pragma once
#include "common.h"

// gate, up, out: same shape and dtype (float32 or bfloat16 bits), contiguous; out = silu(gate) * up.
void swiglu_forward(py::array gate, py::array up, py::array out);
void swiglu_backward(py::array gate, py::array up, py::array grad_out, py::array grad_gate, py::array grad_up);
// The forward on raw, already checked buffers of n elements (out may be gate).
void swiglu_rows(FloatOrBf16 gate, FloatOrBf16 up, int64_t n, void* out, bool out_bf16);
