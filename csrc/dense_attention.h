#pragma once
// The decoder's attention over dense rows, forward and backward (see dense_attention.cpp).
#include <optional>

#include "common.h"

// Gradients of out = softmax(scale q k^T + mask) v (causal: query t sees keys <= t + S - T) for bf16 q [B, T, H, D],
// k and v [B, S, KV, D] (H a multiple of KV), given out and grad_out [B, T, H, D] (bf16) and the forward's
// log-sum-exp lse [B, T, H] (float32); mask [1 or B, T, S] additive (float32 or bf16), or none. Writes grad_q,
// grad_k, grad_v (bf16, the shapes of q, k, v). AMX tiles (VDPBF16PS without AMX), fp32 accumulation.
// The forward for the same operands: out [B, T, H, D] (bf16) and lse [B, T, H] (float32, -inf for a row that sees no
// key, whose output is 0). Online softmax over 32-key tiles, fp32; P rounded to bf16 as the P V operand.
void attention_forward_bf16(py::array q, py::array k, py::array v, std::optional<py::array> mask, bool causal,
                            float scale, py::array out, f32_out lse);
void attention_backward_bf16(py::array q, py::array k, py::array v, py::array out, py::array grad_out, f32_array lse,
                             std::optional<py::array> mask, bool causal, float scale, py::array grad_q,
                             py::array grad_k, py::array grad_v);
