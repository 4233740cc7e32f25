#pragma once
#include "common.h"

void pm_pairs(f32_array rewards, i64_array pairs, f32_array prob, f32_array weight, f32_array margin,
              i64_array group, f32_out pair_loss, f32_out pair_grad, f32_out resp_grad, f32_out group_stats,
              i64_array_out resp_group);
