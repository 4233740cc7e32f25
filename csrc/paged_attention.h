#pragma once
#include <optional>

#include "common.h"

using i32_array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

void paged_decode(f32_array q, py::array k_cache, py::array v_cache, i32_array block_tables, i32_array context_lens,
                  float scale, f32_out out, std::optional<f32_out> lse, int64_t first_block);
// Every context length fits its block table [B, W] and every block it uses (from first_block on) is one of the
// cache's NB blocks of BS tokens; else an error naming the entry.
void check_block_tables(const int32_t* tables, const int32_t* lens, int64_t B, int64_t W, int64_t NB, int64_t BS,
                        int64_t first_block);
