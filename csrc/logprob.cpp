// Per-tile epilogues of the fused log-prob / entropy / KL ops on CPU.
//
// The caller computes one chunk of raw logits z = h @ W^T (+ b) with a BLAS GEMM; these functions
// reduce each row to per-token statistics (forward) or overwrite it in place with dL/dz (backward),
// so only a [chunk, V] tile ever exists. Softmax is over z * inv_temp.
#include "logprob.h"

#include <cmath>
#include <limits>

#include "vecmath.h"

namespace {

struct RowStats {
  float max;  // max of scaled logits
  float sum;  // sum exp(z - max)
  float ent;  // sum exp(z - max) * (z - max), for the entropy
};

CAI_MULTIVERSION float scaled_max(const float* z, int64_t n, float inv_temp) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = z[j] * inv_temp > m ? z[j] * inv_temp : m;
  return m;
}

CAI_MULTIVERSION RowStats row_stats(const float* z, int64_t n, float inv_temp, bool with_entropy) {
  const float m = scaled_max(z, n, inv_temp);
  float s = 0.f, u = 0.f;
  if (with_entropy) {
#pragma omp simd reduction(+ : s, u)
    for (int64_t j = 0; j < n; ++j) {
      const float d = z[j] * inv_temp - m;
      const float e = exp_nonpositive(d);
      s += e;
      u += e > 0.f ? e * d : 0.f;  // exp underflow times -inf would be NaN
    }
  } else {
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < n; ++j) s += exp_nonpositive(z[j] * inv_temp - m);
  }
  return {m, s, u};
}

// dz_j = inv_temp * (g_lp * (onehot_j - p_j) - g_ent * p_j * (zs_j - E[zs]))
CAI_MULTIVERSION void logprob_grad_row(float* z, int64_t n, float inv_temp, float lse, float mean_z, float g_lp,
                                       float g_ent) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float zs = z[j] * inv_temp;
    const float p = exp_nonpositive(zs - lse);
    z[j] = -p * (g_lp + g_ent * (zs - mean_z)) * inv_temp;
  }
}

CAI_MULTIVERSION void kl_row(const float* z, const float* r, int64_t n, float inv_temp, float* out) {
  float mz = -std::numeric_limits<float>::infinity(), mr = mz;
#pragma omp simd reduction(max : mz, mr)
  for (int64_t j = 0; j < n; ++j) {
    mz = z[j] > mz ? z[j] : mz;
    mr = r[j] > mr ? r[j] : mr;
  }
  mz *= inv_temp;
  mr *= inv_temp;
  float sz = 0.f, sr = 0.f, w = 0.f;
#pragma omp simd reduction(+ : sz, sr, w)
  for (int64_t j = 0; j < n; ++j) {
    const float zs = z[j] * inv_temp, rs = r[j] * inv_temp;
    const float e = exp_nonpositive(zs - mz);
    sz += e;
    sr += exp_nonpositive(rs - mr);
    w += e > 0.f ? e * (zs - rs) : 0.f;
  }
  const float lse_z = mz + std::log(sz), lse_r = mr + std::log(sr);
  out[0] = lse_z;
  out[1] = w / sz;                      // E_p[zs - rs]
  out[2] = out[1] - lse_z + lse_r;      // KL(p || q)
}

// dKL/dz_j = inv_temp * g * p_j * ((zs_j - rs_j) - E_p[zs - rs])
CAI_MULTIVERSION void kl_grad_row(float* z, const float* r, int64_t n, float inv_temp, float lse, float mean_diff,
                                  float g) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float zs = z[j] * inv_temp;
    const float p = exp_nonpositive(zs - lse);
    z[j] = g * p * ((zs - r[j] * inv_temp) - mean_diff) * inv_temp;
  }
}

void check_rows(const py::array& a, py::ssize_t rows, const char* name) {
  check_ndim(a, 1, name);
  check_dim(a, 0, rows, name);
}

float* out_ptr(f32_out& a, py::ssize_t rows, const char* name) {
  check_dim(a, 0, rows, name);
  if (!(a.flags() & py::array::c_style)) throw std::invalid_argument(std::string(name) + ": must be contiguous");
  return a.mutable_data();
}

}  // namespace

void check_labels(const int64_t* labels, int64_t rows, int64_t vocab, int64_t ignore_index) {
  for (int64_t i = 0; i < rows; ++i)
    if (labels[i] != ignore_index && (labels[i] < 0 || labels[i] >= vocab))
      throw std::invalid_argument("labels[" + std::to_string(i) + "] = " + std::to_string(labels[i]) +
                                  " is outside [0, " + std::to_string(vocab) + ") and is not ignore_index (" +
                                  std::to_string(ignore_index) + ")");
}

void logprob_forward(f32_array logits, i64_array labels, float inv_temp, int64_t ignore_index,
                     f32_out logp, f32_out lse, py::object entropy) {
  check_ndim(logits, 2, "logits");
  const int64_t rows = logits.shape(0), vocab = logits.shape(1);
  check_rows(labels, rows, "labels");
  check_ndim(logp, 1, "logp");
  check_ndim(lse, 1, "lse");
  float* lp = out_ptr(logp, rows, "logp");
  float* ls = out_ptr(lse, rows, "lse");
  float* ent = nullptr;
  f32_out ent_arr;
  if (!entropy.is_none()) {
    ent_arr = entropy.cast<f32_out>();
    check_ndim(ent_arr, 1, "entropy");
    ent = out_ptr(ent_arr, rows, "entropy");
  }
  const float* z = logits.data();
  const int64_t* y = labels.data();
  check_labels(y, rows, vocab, ignore_index);
  py::gil_scoped_release nogil;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows; ++i) {
    const float* zi = z + i * vocab;
    const RowStats st = row_stats(zi, vocab, inv_temp, ent != nullptr);
    const float log_sum = std::log(st.sum);
    ls[i] = st.max + log_sum;
    const bool ignored = y[i] == ignore_index;
    lp[i] = ignored ? 0.f : zi[y[i]] * inv_temp - ls[i];
    if (ent) ent[i] = ignored ? 0.f : log_sum - st.ent / st.sum;
  }
}

void logprob_backward(f32_out logits, i64_array labels, float inv_temp, f32_array lse, f32_array entropy,
                      f32_array grad_logp, f32_array grad_entropy) {
  check_ndim(logits, 2, "logits");
  const int64_t rows = logits.shape(0), cols = logits.shape(1);
  float* z = out_ptr(logits, rows, "logits");
  for (auto* a : {&lse, &entropy, &grad_logp, &grad_entropy}) check_rows(*a, rows, "row statistics");
  check_rows(labels, rows, "labels");
  const int64_t* y = labels.data();
  const float *ls = lse.data(), *ent = entropy.data(), *glp = grad_logp.data(), *gent = grad_entropy.data();
  py::gil_scoped_release nogil;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows; ++i) {
    float* zi = z + i * cols;
    logprob_grad_row(zi, cols, inv_temp, ls[i], ls[i] - ent[i], glp[i], gent[i]);
    if (y[i] >= 0 && y[i] < cols) zi[y[i]] += glp[i] * inv_temp;
  }
}

void kl_forward(f32_array logits, f32_array ref_logits, float inv_temp, f32_out kl,
                f32_out lse, f32_out mean_diff) {
  check_ndim(logits, 2, "logits");
  const int64_t rows = logits.shape(0), vocab = logits.shape(1);
  check_ndim(ref_logits, 2, "ref_logits");
  check_dim(ref_logits, 0, rows, "ref_logits");
  check_dim(ref_logits, 1, vocab, "ref_logits");
  for (auto* a : {&kl, &lse, &mean_diff}) check_ndim(*a, 1, "row statistics");
  float *k = out_ptr(kl, rows, "kl"), *ls = out_ptr(lse, rows, "lse"), *md = out_ptr(mean_diff, rows, "mean_diff");
  const float *z = logits.data(), *r = ref_logits.data();
  py::gil_scoped_release nogil;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows; ++i) {
    float out[3];
    kl_row(z + i * vocab, r + i * vocab, vocab, inv_temp, out);
    ls[i] = out[0];
    md[i] = out[1];
    k[i] = out[2];
  }
}

void kl_backward(f32_out logits, f32_array ref_logits, float inv_temp, f32_array lse,
                 f32_array mean_diff, f32_array grad_kl) {
  check_ndim(logits, 2, "logits");
  const int64_t rows = logits.shape(0), vocab = logits.shape(1);
  float* z = out_ptr(logits, rows, "logits");
  check_ndim(ref_logits, 2, "ref_logits");
  check_dim(ref_logits, 0, rows, "ref_logits");
  check_dim(ref_logits, 1, vocab, "ref_logits");
  for (auto* a : {&lse, &mean_diff, &grad_kl}) check_rows(*a, rows, "row statistics");
  const float *r = ref_logits.data(), *ls = lse.data(), *md = mean_diff.data(), *g = grad_kl.data();
  py::gil_scoped_release nogil;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows; ++i)
    kl_grad_row(z + i * vocab, r + i * vocab, vocab, inv_temp, ls[i], md[i], g[i]);
}
