// RMSNorm over rows (CPU): y = x * rstd * w with rstd = 1 / sqrt(mean(x^2) + eps), and its gradients.
//
// x, y, grad_y and grad_x are each float32 or bfloat16: a row is converted into float scratch first, so the
// arithmetic is float32 and a bf16 result is rounded once (under bf16-mixed the norm reads the fp32 residual
// stream and hands the projections bf16 directly). grad_weight is a deterministic sum: one partial row per
// fixed block of rows, then the blocks added in order, so it never depends on the thread count (exact resume
// compares weights bit for bit).
#include "rms_norm.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "vecmath.h"

namespace {

constexpr int64_t kRowsPerBlock = 32;

CAI_MULTIVERSION void forward_block(FloatOrBf16 x, const float* w, float eps, int64_t r0, int64_t r1, int64_t d,
                                    void* y, bool y_bf16, float* rstd) {
  std::vector<float> row(d);
  for (int64_t r = r0; r < r1; ++r) {
    load_floats(x.data, x.bf16, r * d, d, row.data());
    float squares = 0.f;
#pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < d; ++i) squares += row[i] * row[i];
    const float s = 1.f / std::sqrt(squares / static_cast<float>(d) + eps);
    rstd[r] = s;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) row[i] = row[i] * s * w[i];
    store_floats(row.data(), d, y, y_bf16, r * d);
  }
}

// d/dx_i = s * (g_i w_i - xhat_i * mean_j(g_j w_j xhat_j)) with xhat = x * s; d/dw_i = sum over rows of g_i xhat_i.
CAI_MULTIVERSION void backward_block(FloatOrBf16 x, const float* w, const float* rstd, FloatOrBf16 grad_y,
                                     int64_t r0, int64_t r1, int64_t d, void* grad_x, bool grad_x_bf16,
                                     float* grad_w_partial) {
  std::vector<float> xr(d), gr(d);
  std::fill(grad_w_partial, grad_w_partial + d, 0.f);
  for (int64_t r = r0; r < r1; ++r) {
    load_floats(x.data, x.bf16, r * d, d, xr.data());
    load_floats(grad_y.data, grad_y.bf16, r * d, d, gr.data());
    const float s = rstd[r];
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < d; ++i) {
      const float xhat = xr[i] * s;
      grad_w_partial[i] += gr[i] * xhat;
      dot += gr[i] * w[i] * xhat;
    }
    const float c = dot / static_cast<float>(d);
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) xr[i] = s * (gr[i] * w[i] - xr[i] * s * c);
    store_floats(xr.data(), d, grad_x, grad_x_bf16, r * d);
  }
}

void check_rows(const py::array& x, const f32_array& weight, int64_t& rows, int64_t& d) {
  check_ndim(x, 2, "x");
  check_ndim(weight, 1, "weight");
  rows = x.shape(0);
  d = x.shape(1);
  check_dim(weight, 0, d, "weight");
}

}  // namespace

void rms_norm_rows(FloatOrBf16 x, const float* weight, float eps, int64_t rows, int64_t d, void* y, bool y_bf16,
                   float* rstd) {
  forward_block(x, weight, eps, 0, rows, d, y, y_bf16, rstd);
}

void rms_norm_forward(py::array x, f32_array weight, float eps, py::array y, f32_out rstd) {
  int64_t rows, d;
  check_rows(x, weight, rows, d);
  const FloatOrBf16 xb = float_or_bf16(x, rows * d, "x"), yb = float_or_bf16(y, rows * d, "y");
  void* yp = writable(y, "y");
  check_ndim(rstd, 1, "rstd");
  check_dim(rstd, 0, rows, "rstd");
  const float* w = weight.data();
  float* rs = rstd.mutable_data();
  py::gil_scoped_release nogil;
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b)
    forward_block(xb, w, eps, b * kRowsPerBlock, std::min(rows, (b + 1) * kRowsPerBlock), d, yp, yb.bf16, rs);
}

void rms_norm_backward(py::array x, f32_array weight, f32_array rstd, py::array grad_y, py::array grad_x,
                       f32_out grad_weight) {
  int64_t rows, d;
  check_rows(x, weight, rows, d);
  const FloatOrBf16 xb = float_or_bf16(x, rows * d, "x"), gy = float_or_bf16(grad_y, rows * d, "grad_y"),
                    gx = float_or_bf16(grad_x, rows * d, "grad_x");
  void* gxp = writable(grad_x, "grad_x");
  check_ndim(rstd, 1, "rstd");
  check_dim(rstd, 0, rows, "rstd");
  check_ndim(grad_weight, 1, "grad_weight");
  check_dim(grad_weight, 0, d, "grad_weight");
  const float *w = weight.data(), *rs = rstd.data();
  float* gw = grad_weight.mutable_data();
  py::gil_scoped_release nogil;
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  std::vector<float> partial(std::max<int64_t>(blocks, 1) * d);
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b)
    backward_block(xb, w, rs, gy, b * kRowsPerBlock, std::min(rows, (b + 1) * kRowsPerBlock), d, gxp, gx.bf16,
                   partial.data() + b * d);
  std::fill(gw, gw + d, 0.f);
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t i = 0; i < d; ++i) gw[i] += partial[b * d + i];
}
