// Row-wise log-sum-exp: the reduction every softmax-shaped op here is built on.
#include "rowstats.h"

#include <algorithm>
#include <cmath>
#include <limits>
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif
#include <utility>
#include <vector>

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

namespace {

constexpr int kBuckets = 2048;      // histogram of scaled logits d = (z - max) / T over [-kRange, 0]
constexpr float kRange = 64.f;      // below it, e^-64 per token: the last bucket holds the rest
constexpr int64_t kChunk = 256;

inline int bucket_of(float d) {
  const float b = -d * (kBuckets / kRange);
  return b >= kBuckets - 1 ? kBuckets - 1 : int(b);
}

// d = (z - max) * inv_temp and e = exp(d) into scratch, with the raw and the scaled sums of exponentials (one and
// the same at temperature 1, where a second exp per token would be wasted).
CAI_MULTIVERSION void scaled_exps(const float* z, int64_t n, float inv_temp, float m, float* d, float* e, float& raw,
                                  float& scaled) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) {
    d[i] = (z[i] - m) * inv_temp;
    e[i] = exp_nonpositive(d[i]);
    ss += e[i];
  }
  scaled = ss;
  if (inv_temp == 1.f) {
    raw = ss;
    return;
  }
  float rs = 0.f;
#pragma omp simd reduction(+ : rs)
  for (int64_t i = 0; i < n; ++i) rs += exp_nonpositive(z[i] - m);
  raw = rs;
}

CAI_MULTIVERSION float row_max(const float* z, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = z[i] > m ? z[i] : m;
  return m;
}

CAI_MULTIVERSION float kept_sum(const float* d, const float* e, int64_t n, float t) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += d[i] >= t ? e[i] : 0.f;
  return s;
}

// The nucleus threshold on d: keep every token with d >= t, the smallest set of most likely tokens whose mass
// reaches top_p (ties at the cut kept). A histogram of d finds the bucket where the mass from the top crosses
// top_p * total; only that bucket's tokens are sorted. The histogram is a scalar pass, so it runs over the
// candidates only: the tokens within kCandidates of the max, when their mass already reaches the target (a
// language model's row: a few hundred of 50k tokens), else the whole row.
constexpr float kCandidates = -16.f;  // e^-16 = 1e-7 of the top token's weight

// (d, e) of the tokens with d >= cut, in order, into cd / ce (room for n); returns how many.
int64_t compact_scalar(const float* d, const float* e, int64_t n, float cut, float* cd, float* ce) {
  int64_t k = 0;
  for (int64_t i = 0; i < n; ++i)
    if (d[i] >= cut) {
      cd[k] = d[i];
      ce[k++] = e[i];
    }
  return k;
}

#if defined(__GNUC__) && defined(__x86_64__)
__attribute__((target("avx512f"))) int64_t compact_avx512(const float* d, const float* e, int64_t n, float cut,
                                                          float* cd, float* ce) {
  const __m512 c = _mm512_set1_ps(cut);
  int64_t k = 0, i = 0;
  for (; i + 16 <= n; i += 16) {  // most 16-token groups of a language model's row hold no candidate
    const __m512 dv = _mm512_loadu_ps(d + i);
    const __mmask16 m = _mm512_cmp_ps_mask(dv, c, _CMP_GE_OQ);
    if (!m) continue;
    _mm512_mask_compressstoreu_ps(cd + k, m, dv);
    _mm512_mask_compressstoreu_ps(ce + k, m, _mm512_loadu_ps(e + i));
    k += __builtin_popcount(m);
  }
  return k + compact_scalar(d + i, e + i, n - i, cut, cd + k, ce + k);
}
#endif

int64_t compact(const float* d, const float* e, int64_t n, float cut, float* cd, float* ce) {
#if defined(__GNUC__) && defined(__x86_64__)
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (avx512) return compact_avx512(d, e, n, cut, cd, ce);
#endif
  return compact_scalar(d, e, n, cut, cd, ce);
}

float nucleus_threshold(const float* d, const float* e, int64_t n, float total, float top_p, std::vector<float>& mass,
                        std::vector<std::pair<float, float>>& bucket, std::vector<float>& cd, std::vector<float>& ce) {
  const float target = top_p * total;
  float near = 0.f;
  for (int64_t c = 0; c < n; c += kChunk) near += kept_sum(d + c, e + c, std::min(kChunk, n - c), kCandidates);
  if (near >= target) {  // the candidates only
    n = compact(d, e, n, kCandidates, cd.data(), ce.data());
    d = cd.data();
    e = ce.data();
  }
  std::fill(mass.begin(), mass.end(), 0.f);
  for (int64_t i = 0; i < n; ++i) mass[bucket_of(d[i])] += e[i];
  float above = 0.f;
  int b = 0;
  for (; b < kBuckets - 1 && above + mass[b] < target; ++b) above += mass[b];
  bucket.clear();
  for (int64_t i = 0; i < n; ++i)
    if (bucket_of(d[i]) == b) bucket.emplace_back(d[i], e[i]);
  std::sort(bucket.begin(), bucket.end(), [](const auto& x, const auto& y) { return x.first > y.first; });
  for (const auto& [di, ei] : bucket) {
    above += ei;
    if (above >= target) return di;
  }
  return bucket.empty() ? 0.f : bucket.back().first;  // rounding left the target unreached: keep the bucket
}

}  // namespace

void sample_nucleus(f32_array logits, f32_array inv_temp, f32_array top_p, f32_array uniforms, i64_array_out tokens,
                    f32_out raw_logprob, f32_out processed_logprob) {
  check_ndim(logits, 2, "logits");
  const int64_t rows = logits.shape(0), n = logits.shape(1);
  for (auto [a, name] : {std::pair<const py::array*, const char*>{&inv_temp, "inv_temp"}, {&top_p, "top_p"},
                         {&uniforms, "uniforms"}, {&tokens, "tokens"}, {&raw_logprob, "raw_logprob"},
                         {&processed_logprob, "processed_logprob"}}) {
    check_ndim(*a, 1, name);
    check_dim(*a, 0, rows, name);
  }
  if (n < 1) throw std::invalid_argument("logits: expected at least one column");
  const float *pz = logits.data(), *pt = inv_temp.data(), *pp = top_p.data(), *pu = uniforms.data();
  for (int64_t r = 0; r < rows; ++r)
    if (!(pt[r] > 0.f) || !(pp[r] > 0.f && pp[r] <= 1.f))
      throw std::invalid_argument("row " + std::to_string(r) + ": expected inv_temp > 0 and top_p in (0, 1]");
  int64_t* pk = tokens.mutable_data();
  float *praw = raw_logprob.mutable_data(), *pproc = processed_logprob.mutable_data();
  py::gil_scoped_release nogil;
#pragma omp parallel
  {
    std::vector<float> d(n), e(n), mass(kBuckets), cd(n), ce(n);
    std::vector<std::pair<float, float>> bucket;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float* z = pz + r * n;
      const float m = row_max(z, n);
      if (!std::isfinite(m)) {  // reported below, outside the threads
        pk[r] = -1;
        continue;
      }
      float raw = 0.f, total = 0.f;
      scaled_exps(z, n, pt[r], m, d.data(), e.data(), raw, total);
      const float t = pp[r] < 1.f ? nucleus_threshold(d.data(), e.data(), n, total, pp[r], mass, bucket, cd, ce)
                                  : -std::numeric_limits<float>::infinity();
      float kept = 0.f;  // the nucleus' mass, summed by chunks as the scan below sums it
      for (int64_t c = 0; c < n; c += kChunk) kept += kept_sum(d.data() + c, e.data() + c, std::min(kChunk, n - c), t);
      // invert the nucleus' CDF (vocabulary order) at u * kept: whole chunks first, then the token inside one
      const float target = pu[r] * kept;
      float run = 0.f;
      int64_t pick = -1, last = -1;
      for (int64_t c = 0; c < n && pick < 0; c += kChunk) {
        const int64_t len = std::min(kChunk, n - c);
        const float s = kept_sum(d.data() + c, e.data() + c, len, t);
        if (s > 0.f)
          for (int64_t i = c + len - 1; i >= c; --i)
            if (d[i] >= t && e[i] > 0.f) { last = i; break; }
        if (run + s <= target) {
          run += s;
          continue;
        }
        for (int64_t i = c; i < c + len; ++i)
          if (d[i] >= t && e[i] > 0.f) {
            run += e[i];
            if (run > target) { pick = i; break; }
          }
      }
      pick = pick >= 0 ? pick : last;  // rounding left the target past the end: the last kept token
      pk[r] = pick;
      praw[r] = (z[pick] - m) - std::log(raw);
      pproc[r] = d[pick] - std::log(kept);
    }
  }
  for (int64_t r = 0; r < rows; ++r)
    if (pk[r] < 0) throw std::invalid_argument("logits row " + std::to_string(r) + ": no finite maximum (NaN or all -inf)");
}
