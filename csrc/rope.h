#pragma once
#include "common.h"

// The engine step's rotary embedding fused with its KV-cache write: q [T, H, D] and k [T, KV, D] rotated in place
// (cos and sin_signed [T, D] float32, sin's first half negated: x * cos + roll(x, D/2) * sin_signed), then k and
// v [T, KV, D] written to rows `slots` [T] of the caches [blocks, block_size, KV, D]. Every tensor float32 or
// bfloat16 (16-bit views); fp32 arithmetic, one rounding.
void rope_store(py::array q, py::array k, py::array v, f32_array cos, f32_array sin_signed, py::array k_cache,
                py::array v_cache, i64_array slots);
// The same on raw, already checked buffers (q and k rotated into q_out and k_out, which may be q and k).
void rope_store_rows(FloatOrBf16 q, void* q_out, FloatOrBf16 k, void* k_out, FloatOrBf16 v, int64_t T, int64_t H,
                     int64_t KV, int64_t D, const float* cos, const float* sin_signed, void* k_cache, bool k_cache_bf16,
                     void* v_cache, bool v_cache_bf16, const int64_t* slots);
// Training's rotation: x [N, heads, D] (float32 or bfloat16) rotated into out (same shape and dtype) by cos and
// sin_signed [N, D] float32, one row of positions per N; inverse rotates back (the gradient). fp32, one rounding.
void rope_rows(py::array x, f32_array cos, f32_array sin_signed, py::array out, bool inverse);
