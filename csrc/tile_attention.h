#pragma once
#include <optional>

#include "paged_attention.h"

// Every query row q [R, H, D] (bfloat16 bits) against the shared prefix blocks `prefix` [P] of the caches
// [blocks, 16, KV, D] (bfloat16 bits): out [R, H, D] the normalised partial output, lse [R, H] its log-sum-exp
// (float32), ready to merge with each row's own keys. AMX (or VDPBF16PS) scores, fp32 softmax and P V.
void prefix_attention(py::array q, py::array k_cache, py::array v_cache, i32_array prefix, float scale, f32_out out,
                      f32_out lse);
// Paged attention with the same tiles: each sequence's newest query_lens[b] tokens (default 1: a decode step; q
// [tokens, H, D] bf16 bits, the sequences' rows in order) over its blocks from first_block on, causal among the new
// tokens: out [tokens, H, D] and lse [tokens, H] float32, as paged_decode gives them for one token each.
void paged_attention_bf16(py::array q, py::array k_cache, py::array v_cache, i32_array block_tables,
                          i32_array context_lens, float scale, f32_out out, f32_out lse, int64_t first_block,
                          std::optional<i32_array> query_lens);
// Both on raw, already checked buffers (16-token blocks, head_dim a multiple of 32, H / KV <= 32).
void prefix_attention_tiles(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache, const int32_t* prefix,
                            int64_t P, int64_t R, int64_t H, int64_t D, int64_t KV, float scale, float* out,
                            float* lse);
void paged_decode_tiles(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache, const int32_t* tables,
                        const int32_t* lens, int64_t W, int64_t first_block, int64_t R, int64_t H, int64_t D,
                        int64_t KV, float scale, float* out, float* lse);
