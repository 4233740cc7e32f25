#pragma once
#include "common.h"

// The engine step's rotary embedding fused with its KV-cache write: q [T, H, D] and k [T, KV, D] rotated in place
// (cos and sin_signed [T, D] float32, sin's first half negated: x * cos + roll(x, D/2) * sin_signed), then k and
// v [T, KV, D] written to rows `slots` [T] of the caches [blocks, block_size, KV, D]. Every tensor float32 or
// bfloat16 (16-bit views); fp32 arithmetic, one rounding.
void rope_store(py::array q, py::array k, py::array v, f32_array cos, f32_array sin_signed, py::array k_cache,
                py::array v_cache, i64_array slots);
