#pragma once
#include "common.h"

float row_logsumexp(const float* x, int64_t n);
f32_array logsumexp_rows(f32_array x);
