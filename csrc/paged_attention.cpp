// Paged-attention decode on CPU: one new query per sequence against its KV blocks, read in place
// through the block table (no gather), one block at a time with an online softmax. Threads take
// (sequence, KV head) pairs; the G query heads of a GQA group share each K/V row they load.
#include "paged_attention.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "vecmath.h"

namespace {

// One block of n <= BS keys for the G query rows of a KV head: scores, then the online-softmax update
// of each row's running max m, sum l and unnormalised output acc [G, D]. One function so every loop
// (the dots, the exps, the axpys) is compiled, and vectorised, for the clone's instruction set.
CAI_MULTIVERSION void attend_block(const float* q, int64_t G, const float* k, const float* v, int64_t n, int64_t D,
                                   int64_t row_stride, float* m, float* l, float* acc, float* s) {
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = q + g * D;
    float* sg = s + g * n;
    for (int64_t t = 0; t < n; ++t) {
      const float* kt = k + t * row_stride;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += qg[d] * kt[d];
      sg[t] = dot;
    }
    float m_new = m[g];
#pragma omp simd reduction(max : m_new)
    for (int64_t t = 0; t < n; ++t) m_new = sg[t] > m_new ? sg[t] : m_new;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < n; ++t) {
      sg[t] = exp_nonpositive(sg[t] - m_new);
      sum += sg[t];
    }
    const float alpha = exp_nonpositive(m[g] - m_new);  // m = -inf before the first block: alpha = 0
    l[g] = l[g] * alpha + sum;
    m[g] = m_new;
    float* ag = acc + g * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) ag[d] *= alpha;
    for (int64_t t = 0; t < n; ++t) {
      const float p = sg[t];
      const float* vt = v + t * row_stride;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) ag[d] += p * vt[d];
    }
  }
}

}  // namespace

void paged_decode(f32_array q, f32_array k_cache, f32_array v_cache, i32_array block_tables, i32_array context_lens,
                  float scale, f32_out out, std::optional<f32_out> lse, int64_t first_block) {
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
  if (lse) {
    check_ndim(*lse, 2, "lse");
    check_dim(*lse, 0, B, "lse");
    check_dim(*lse, 1, H, "lse");
  }
  if (first_block < 0) throw std::invalid_argument("first_block must be >= 0");
  const int64_t G = H / KV;
  const float *qp = q.data(), *kp = k_cache.data(), *vp = v_cache.data();
  const int32_t *tab = block_tables.data(), *lens = context_lens.data();
  for (int64_t b = 0; b < B; ++b) {
    if (lens[b] < 1 || (lens[b] + BS - 1) / BS > W)
      throw std::invalid_argument("context_lens[" + std::to_string(b) + "] = " + std::to_string(lens[b]) +
                                  " does not fit its block table of " + std::to_string(W) + " blocks");
    for (int64_t i = first_block; i < (lens[b] + BS - 1) / BS; ++i)
      if (tab[b * W + i] < 0 || tab[b * W + i] >= NB)
        throw std::invalid_argument("block_tables[" + std::to_string(b) + "][" + std::to_string(i) +
                                    "] is not a block of the cache");
  }
  float* op = out.mutable_data();
  float* lp = lse ? lse->mutable_data() : nullptr;
  py::gil_scoped_release nogil;
#pragma omp parallel
  {
    std::vector<float> qs(G * D), scores(G * BS), m(G), l(G);
#pragma omp for schedule(dynamic) collapse(2)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t kvh = 0; kvh < KV; ++kvh) {
        const int64_t head = b * H + kvh * G;
        for (int64_t i = 0; i < G * D; ++i) qs[i] = qp[head * D + i] * scale;
        std::fill(m.begin(), m.end(), -INFINITY);
        std::fill(l.begin(), l.end(), 0.f);
        float* o = op + head * D;
        std::fill(o, o + G * D, 0.f);
        for (int64_t blk = first_block; blk * BS < lens[b]; ++blk) {
          const int64_t base = (static_cast<int64_t>(tab[b * W + blk]) * BS * KV + kvh) * D;
          attend_block(qs.data(), G, kp + base, vp + base, std::min<int64_t>(BS, lens[b] - blk * BS), D, KV * D,
                       m.data(), l.data(), o, scores.data());
        }
        for (int64_t g = 0; g < G; ++g) {  // no key past first_block: an empty partial (0, -inf)
          const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
          for (int64_t d = 0; d < D; ++d) o[g * D + d] *= inv;
          if (lp) lp[head + g] = l[g] > 0.f ? m[g] + std::log(l[g]) : -INFINITY;
        }
      }
    }
  }
}
