#pragma once
#include "paged_attention.h"

// fp32 attention over a float32 paged cache [blocks, BS, KV, D] on AVX2 + FMA (head_dim a multiple of 16, at most
// 48 query heads per KV head); both write each row's normalised output and log-sum-exp (float32), ready to merge
// with the other part of a cascade.
// Every query row q [R, H, D] against the shared prefix blocks `prefix` [P] (read in place).
void prefix_attention_f32(f32_array q, py::array k_cache, py::array v_cache, i32_array prefix, float scale,
                          f32_out out, f32_out lse);
// One decode query per sequence, q [B, H, D], over its blocks from first_block on (out [B, H, D], lse [B, H]; a
// sequence with no key there gets zeros and -inf).
void paged_decode_f32(f32_array q, py::array k_cache, py::array v_cache, i32_array block_tables,
                      i32_array context_lens, float scale, f32_out out, f32_out lse, int64_t first_block);
// The same on raw, already checked buffers (the fused decode layer's attention).
void prefix_attention_f32_rows(const float* q, const float* k_cache, const float* v_cache, const int32_t* prefix,
                               int64_t P, int64_t R, int64_t H, int64_t D, int64_t KV, int64_t BS, float scale,
                               float* out, float* lse);
void paged_decode_f32_rows(const float* q, const float* k_cache, const float* v_cache, const int32_t* tables,
                           const int32_t* lens, int64_t W, int64_t first_block, int64_t B, int64_t H, int64_t D,
                           int64_t KV, int64_t BS, float scale, float* out, float* lse);
