// Paged-attention decode on CPU: one new query per sequence against its KV blocks, read in place
// through the block table (no gather). Threads take (sequence, KV head) pairs; the query heads of a
// GQA group share each K/V row they load.
#include "paged_attention.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "vecmath.h"

namespace {

CAI_MULTIVERSION float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

CAI_MULTIVERSION void axpy(float* y, float a, const float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

}  // namespace

void paged_decode(f32_array q, f32_array k_cache, f32_array v_cache, i32_array block_tables, i32_array context_lens,
                  float scale, f32_out out) {
  check_ndim(q, 3, "q");
  check_ndim(k_cache, 4, "k_cache");
  check_ndim(v_cache, 4, "v_cache");
  check_ndim(block_tables, 2, "block_tables");
  const int64_t B = q.shape(0), H = q.shape(1), D = q.shape(2);
  const int64_t BS = k_cache.shape(1), KV = k_cache.shape(2), W = block_tables.shape(1), NB = k_cache.shape(0);
  check_dim(k_cache, 3, D, "k_cache");
  for (int axis = 0; axis < 4; ++axis) check_dim(v_cache, axis, k_cache.shape(axis), "v_cache");
  check_dim(block_tables, 0, B, "block_tables");
  check_dim(context_lens, 0, B, "context_lens");
  if (H % KV) throw std::invalid_argument("q heads must be a multiple of the cache's KV heads");
  for (int axis = 0; axis < 3; ++axis) check_dim(out, axis, q.shape(axis), "out");
  const int64_t G = H / KV;
  const float *qp = q.data(), *kp = k_cache.data(), *vp = v_cache.data();
  const int32_t *tab = block_tables.data(), *lens = context_lens.data();
  for (int64_t b = 0; b < B; ++b) {
    if (lens[b] < 1 || (lens[b] + BS - 1) / BS > W)
      throw std::invalid_argument("context_lens[" + std::to_string(b) + "] = " + std::to_string(lens[b]) +
                                  " does not fit its block table of " + std::to_string(W) + " blocks");
    for (int64_t i = 0; i < (lens[b] + BS - 1) / BS; ++i)
      if (tab[b * W + i] < 0 || tab[b * W + i] >= NB)
        throw std::invalid_argument("block_tables[" + std::to_string(b) + "][" + std::to_string(i) +
                                    "] is not a block of the cache");
  }
  float* op = out.mutable_data();
  py::gil_scoped_release nogil;
#pragma omp parallel
  {
    std::vector<float> scores;
#pragma omp for schedule(dynamic) collapse(2)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t kvh = 0; kvh < KV; ++kvh) {
        const int64_t len = lens[b];
        scores.assign(G * len, 0.f);
        for (int64_t t = 0; t < len; ++t) {
          const int64_t row = (static_cast<int64_t>(tab[b * W + t / BS]) * BS + t % BS) * KV + kvh;
          const float* k = kp + row * D;
          for (int64_t g = 0; g < G; ++g) scores[g * len + t] = dot(qp + (b * H + kvh * G + g) * D, k, D) * scale;
        }
        for (int64_t g = 0; g < G; ++g) {
          float* s = scores.data() + g * len;
          const float m = *std::max_element(s, s + len);
          float sum = 0.f;
          for (int64_t t = 0; t < len; ++t) {
            s[t] = exp_nonpositive(s[t] - m);
            sum += s[t];
          }
          const float inv = 1.f / sum;
          for (int64_t t = 0; t < len; ++t) s[t] *= inv;
        }
        float* o = op + (b * H + kvh * G) * D;
        std::fill(o, o + G * D, 0.f);
        for (int64_t t = 0; t < len; ++t) {
          const int64_t row = (static_cast<int64_t>(tab[b * W + t / BS]) * BS + t % BS) * KV + kvh;
          const float* v = vp + row * D;
          for (int64_t g = 0; g < G; ++g) axpy(o + g * D, scores[g * len + t], v, D);
        }
      }
    }
  }
}
