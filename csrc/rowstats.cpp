// Row-wise log-sum-exp: the reduction every softmax-shaped op here is built on.
#include "rowstats.h"

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

CAI_MULTIVERSION float mass_at_least(const float* p, int64_t n, float t) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += p[i] >= t ? p[i] : 0.f;
  return s;
}

}  // namespace

float top_p_threshold(f32_array probs, float top_p, int iterations) {
  check_ndim(probs, 1, "probs");
  const float* p = probs.data();
  const int64_t n = probs.shape(0);
  float lo = 0.f, hi = 0.f;
  for (int64_t i = 0; i < n; ++i) hi = p[i] > hi ? p[i] : hi;
  for (int it = 0; it < iterations; ++it) {
    const float mid = 0.5f * (lo + hi);
    if (mass_at_least(p, n, mid) >= top_p) lo = mid; else hi = mid;
  }
  return lo;
}
