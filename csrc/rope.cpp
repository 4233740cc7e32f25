// RoPE + KV-cache write for the engine's step, one pass over the step's new rows (the eager rotation is eight
// tensor ops per layer, and the cache write two scattered copies with dtype casts).
#include "rope.h"

#include <algorithm>
#include <vector>

#include "vecmath.h"

namespace {

// sign -1 rotates back (the angle negated): the gradient of the rotation.
CAI_MULTIVERSION void rotate_rows(FloatOrBf16 x, void* out, int64_t offset, int64_t heads, int64_t D,
                                  const float* cos, const float* sin, float sign = 1.f) {
  std::vector<float> row(D), rotated(D);
  const int64_t half = D / 2;
  for (int64_t h = 0; h < heads; ++h) {
    load_floats(x.data, x.bf16, offset + h * D, D, row.data());
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      rotated[i] = row[i] * cos[i] + row[i + half] * (sign * sin[i]);
      rotated[i + half] = row[i + half] * cos[i + half] + row[i] * (sign * sin[i + half]);
    }
    store_floats(rotated.data(), D, out, x.bf16, offset + h * D);
  }
}

void copy_row(FloatOrBf16 src, int64_t src_offset, void* dst, bool dst_bf16, int64_t dst_offset, int64_t n) {
  std::vector<float> row(n);
  load_floats(src.data, src.bf16, src_offset, n, row.data());
  store_floats(row.data(), n, dst, dst_bf16, dst_offset);
}

void check_rotations(const f32_array& cos, const f32_array& sin_signed, int64_t rows, int64_t D) {
  check_ndim(cos, 2, "cos");
  check_dim(cos, 0, rows, "cos");
  check_dim(cos, 1, D, "cos");
  check_ndim(sin_signed, 2, "sin_signed");
  check_dim(sin_signed, 0, rows, "sin_signed");
  check_dim(sin_signed, 1, D, "sin_signed");
}

}  // namespace

void rope_store(py::array q, py::array k, py::array v, f32_array cos, f32_array sin_signed, py::array k_cache,
                py::array v_cache, i64_array slots) {
  check_ndim(q, 3, "q");
  check_ndim(k, 3, "k");
  check_ndim(k_cache, 4, "k_cache");
  const int64_t T = q.shape(0), H = q.shape(1), D = q.shape(2), KV = k.shape(1);
  const int64_t rows = k_cache.shape(0) * k_cache.shape(1);
  if (D % 2) throw std::invalid_argument("q: head_dim must be even, got " + std::to_string(D));
  check_dim(k, 0, T, "k");
  check_dim(k, 2, D, "k");
  check_dim(k_cache, 2, KV, "k_cache");
  check_dim(k_cache, 3, D, "k_cache");
  check_rotations(cos, sin_signed, T, D);
  check_ndim(slots, 1, "slots");
  check_dim(slots, 0, T, "slots");
  const FloatOrBf16 qb = float_or_bf16(q, T * H * D, "q"), kb = float_or_bf16(k, T * KV * D, "k"),
                    vb = float_or_bf16(v, T * KV * D, "v"), kc = float_or_bf16(k_cache, rows * KV * D, "k_cache"),
                    vc = float_or_bf16(v_cache, rows * KV * D, "v_cache");
  void *qp = writable(q, "q"), *kp = writable(k, "k"), *kcp = writable(k_cache, "k_cache"),
       *vcp = writable(v_cache, "v_cache");
  const int64_t* sp = slots.data();
  for (int64_t t = 0; t < T; ++t)
    if (sp[t] < 0 || sp[t] >= rows)
      throw std::invalid_argument("slots[" + std::to_string(t) + "] = " + std::to_string(sp[t]) +
                                  " is not a row of the cache (" + std::to_string(rows) + " rows)");
  const float *cp = cos.data(), *snp = sin_signed.data();
  py::gil_scoped_release nogil;
  rope_store_rows(qb, qp, kb, kp, vb, T, H, KV, D, cp, snp, kcp, kc.bf16, vcp, vc.bf16, sp);
}

void rope_store_rows(FloatOrBf16 q, void* q_out, FloatOrBf16 k, void* k_out, FloatOrBf16 v, int64_t T, int64_t H,
                     int64_t KV, int64_t D, const float* cos, const float* sin_signed, void* k_cache, bool k_cache_bf16,
                     void* v_cache, bool v_cache_bf16, const int64_t* slots) {
#pragma omp parallel for schedule(static) if (T > 16)
  for (int64_t t = 0; t < T; ++t) {
    rotate_rows(q, q_out, t * H * D, H, D, cos + t * D, sin_signed + t * D);
    rotate_rows(k, k_out, t * KV * D, KV, D, cos + t * D, sin_signed + t * D);
    copy_row({k_out, k.bf16}, t * KV * D, k_cache, k_cache_bf16, slots[t] * KV * D, KV * D);
    copy_row(v, t * KV * D, v_cache, v_cache_bf16, slots[t] * KV * D, KV * D);
  }
}

void rope_rows(py::array x, f32_array cos, f32_array sin_signed, py::array out, bool inverse) {
  check_ndim(x, 3, "x");
  const int64_t N = x.shape(0), heads = x.shape(1), D = x.shape(2);
  if (D % 2) throw std::invalid_argument("x: head_dim must be even, got " + std::to_string(D));
  check_rotations(cos, sin_signed, N, D);
  const FloatOrBf16 xb = float_or_bf16(x, N * heads * D, "x"), ob = float_or_bf16(out, N * heads * D, "out");
  if (xb.bf16 != ob.bf16) throw std::invalid_argument("out: expected the dtype of x");
  void* op = writable(out, "out");
  const float *cp = cos.data(), *sp = sin_signed.data();
  py::gil_scoped_release nogil;
#pragma omp parallel for schedule(static) if (N > 16)
  for (int64_t n = 0; n < N; ++n) rotate_rows(xb, op, n * heads * D, heads, D, cp + n * D, sp + n * D, inverse ? -1.f : 1.f);
}
