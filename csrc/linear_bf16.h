#pragma once
#include "common.h"

// y_j = x W_j^T (+ b_j) for each weight j (one packing of x for all: a layer's q, k and v), plus `residual`
// (with one weight). x [M, K], weights [N_j, K], residual [M, N] bfloat16 as int16 views; biases float32 or
// None; outs [M, N_j] bfloat16 (int16 views) or float32, written in place.
// With norm_weight (float32 [K]), x is RMS-normalised first (the standalone rms_norm's bits, rounded to bf16).
void linear_bf16(py::array x, py::list weights, py::list biases, py::list outs, py::object residual,
                 py::object norm_weight, float eps);
// out = silu(x Wg^T) * (x Wu^T): the gated MLP's input to its down projection, rounded once.
void gated_linear_bf16(py::array x, py::array gate_weight, py::array up_weight, py::array out,
                       py::object norm_weight, float eps);
