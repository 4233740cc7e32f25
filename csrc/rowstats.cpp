// Row-wise log-sum-exp: the reduction every softmax-shaped op here is built on.
#include "rowstats.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "vecmath.h"

float row_logsumexp(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  if (!std::isfinite(m)) return m;
  double s = 0.0;
  for (int64_t j = 0; j < n; ++j) s += std::exp(x[j] - m);
  return m + static_cast<float>(std::log(s));
}

f32_array logsumexp_rows(f32_array x) {
  check_ndim(x, 2, "x");
  const int64_t rows = x.shape(0), cols = x.shape(1);
  f32_array out(rows);
  const float* px = x.data();
  float* po = out.mutable_data();
  {
    py::gil_scoped_release nogil;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < rows; ++i) po[i] = row_logsumexp(px + i * cols, cols);
  }
  return out;
}

namespace {

// softmax of one row in place; returns its log-sum-exp (-inf, and a zero row, when every entry is -inf)
CAI_MULTIVERSION float softmax_row(float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  if (!std::isfinite(m)) {
    for (int64_t j = 0; j < n; ++j) x[j] = 0.f;
    return m;
  }
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) {
    x[j] = exp_nonpositive(x[j] - m);
    s += x[j];
  }
  const float inv = 1.f / s;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] *= inv;
  return m + std::log(s);
}

CAI_MULTIVERSION float mass_at_least(const float* p, int64_t n, float t) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += p[i] >= t ? p[i] : 0.f;
  return s;
}

}  // namespace

void softmax_rows_(f32_out x, f32_out lse) {
  check_ndim(x, 2, "x");
  check_ndim(lse, 1, "lse");
  check_dim(lse, 0, x.shape(0), "lse");
  if (!(x.flags() & py::array::c_style)) throw std::invalid_argument("x: expected a C-contiguous array");
  const int64_t rows = x.shape(0), cols = x.shape(1);
  float *px = x.mutable_data(), *pl = lse.mutable_data();
  py::gil_scoped_release nogil;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows; ++i) pl[i] = softmax_row(px + i * cols, cols);
}

f32_array top_p_threshold(f32_array probs, f32_array top_p, int iterations) {
  check_ndim(probs, 2, "probs");
  check_ndim(top_p, 1, "top_p");
  check_dim(top_p, 0, probs.shape(0), "top_p");
  const int64_t rows = probs.shape(0), n = probs.shape(1);
  f32_array out(rows);
  const float *pp = probs.data(), *tp = top_p.data();
  float* po = out.mutable_data();
  py::gil_scoped_release nogil;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* p = pp + r * n;
    float lo = 0.f, hi = 0.f;
    for (int64_t i = 0; i < n; ++i) hi = p[i] > hi ? p[i] : hi;
    for (int it = 0; it < iterations; ++it) {
      const float mid = 0.5f * (lo + hi);
      if (mass_at_least(p, n, mid) >= tp[r]) lo = mid; else hi = mid;
    }
    po[r] = lo;
  }
  return out;
}

namespace {

CAI_MULTIVERSION float exp_sum(const float* x, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += exp_nonpositive(x[i]);
  return s;
}

}  // namespace

i64_array sample_rows(f32_array logprobs, f32_array uniforms) {
  check_ndim(logprobs, 2, "logprobs");
  check_ndim(uniforms, 1, "uniforms");
  check_dim(uniforms, 0, logprobs.shape(0), "uniforms");
  const int64_t rows = logprobs.shape(0), n = logprobs.shape(1);
  i64_array out(rows);
  const float *pl = logprobs.data(), *pu = uniforms.data();
  int64_t* po = out.mutable_data();
  py::gil_scoped_release nogil;
  constexpr int64_t chunk = 256;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = pl + r * n;
    // pass 1: the row's total mass (about 1; summed with the same exp as the scan, so the two agree)
    float total = 0.f;
    for (int64_t c = 0; c < n; c += chunk) total += exp_sum(x + c, std::min(chunk, n - c));
    const float target = pu[r] * total;
    // pass 2: the chunk where the running mass passes the target, then the token inside it
    float run = 0.f;
    int64_t pick = -1, last_positive = -1;
    for (int64_t c = 0; c < n && pick < 0; c += chunk) {
      const int64_t len = std::min(chunk, n - c);
      const float s = exp_sum(x + c, len);
      if (s > 0.f) {
        for (int64_t i = c + len - 1; i >= c; --i)
          if (x[i] > -87.f) { last_positive = i; break; }
      }
      if (run + s <= target) {
        run += s;
        continue;
      }
      for (int64_t i = c; i < c + len; ++i) {
        run += exp_nonpositive(x[i]);
        if (run > target && x[i] > -87.f) { pick = i; break; }
      }
    }
    po[r] = pick >= 0 ? pick : last_positive;  // rounding left the target past the end: the last token with mass
  }
  return out;
}
