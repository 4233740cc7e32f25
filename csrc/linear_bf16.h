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

// The same on raw, already checked buffers (for fused ops that chain them); the caller holds the GIL released
// or not, as it likes. out_bf16: the output is bfloat16 bits, else float32.
struct LinearTarget {
  const uint16_t* weight;  // [rows, K]
  const float* bias;       // [rows] or null
  int64_t rows;
  void* out;               // [M, rows]
  bool out_bf16;
};
void linear_tiles(const uint16_t* x, int64_t M, int64_t K, const LinearTarget* targets, int count,
                  const uint16_t* residual, const float* norm_weight, float eps);
void gated_linear_tiles(const uint16_t* x, int64_t M, int64_t K, const uint16_t* gate, const uint16_t* up, int64_t N,
                        uint16_t* out, const float* norm_weight, float eps);
