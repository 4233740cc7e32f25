#pragma once
#include <optional>

#include "common.h"

using i32_array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

void paged_decode(f32_array q, py::array k_cache, py::array v_cache, i32_array block_tables, i32_array context_lens,
                  float scale, f32_out out, std::optional<f32_out> lse, int64_t first_block);
