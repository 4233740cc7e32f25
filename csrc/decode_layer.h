#pragma once
#include "paged_attention.h"

// One decoder layer of an engine decode step (every row of x [T, d] one sequence's newest token), x updated in
// place: weights [q, k, v, o, gate, up, down], x and cache all bf16 (AMX tiles, 16-token blocks) or all float32 (AVX2,
// any block size); norms and biases fp32 or bf16, fp32 rotations.
// shared_blocks > 0: block_tables[0][:shared_blocks] are every row's first blocks (cascade attention).
void decode_layer(py::array x, py::list weights, py::list biases, py::array input_norm, py::array post_norm,
                  float eps, f32_array cos, f32_array sin_signed, py::array k_cache, py::array v_cache, i64_array slots,
                  i32_array block_tables, i32_array context_lens, int64_t shared_blocks, int64_t heads, float scale);
