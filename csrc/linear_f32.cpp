// fp32 linear layers for the sampling engine's steps on CPUs without bf16 units (where `precision.mode = auto`
// samples in fp32): y = x W^T (+ bias) for the few rows of a decode step, on AVX2 + FMA.
//
// Why not BLAS: torch's fp32 GEMM at a decode step's few rows runs far below both the CPU's FMA rate and its
// memory bandwidth (bench/RESULTS.md, AMD Zen 3), so a step that should stream each weight once costs several
// times that. Here each thread takes a slice of the weight's rows and streams it once: a block of kRows rows
// (at most 4 x 1536 floats, in L1) meets every token of the step, kTokens at a time, in 12 vector accumulators.
#include "linear_f32.h"

#include <immintrin.h>

#include <algorithm>

#ifdef _OPENMP
#include <omp.h>
#endif

#define CAI_AVX2 __attribute__((target("avx2,fma")))

namespace {

constexpr int64_t kRows = 4;    // weight rows per register block
constexpr int64_t kTokens = 3;  // tokens per register block: kRows x kTokens accumulators + kTokens inputs + 1 weight
constexpr int64_t kLanes = 8;

CAI_AVX2 inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// y[t, r] = x[t, :] . w[r, :] (+ b[r]) for R weight rows and T tokens; K a multiple of kLanes. The fixed-count loops
// are unrolled by pragma: without it GCC 12 kept acc[][] in memory, a store after every FMA (bench/RESULTS.md,
// thirteenth session: 1.2-1.5x at 16-64 rows).
template <int R, int T>
CAI_AVX2 void dot_block(const float* x, const float* w, const float* b, int64_t K, float* y, int64_t N) {
  __m256 acc[R][T];
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 8
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += kLanes) {
    __m256 xv[T];
    #pragma GCC unroll 8
    for (int t = 0; t < T; ++t) xv[t] = _mm256_loadu_ps(x + t * K + k);
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 wv = _mm256_loadu_ps(w + r * K + k);
      #pragma GCC unroll 8
      for (int t = 0; t < T; ++t) acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
    }
  }
  #pragma GCC unroll 8
  for (int t = 0; t < T; ++t)
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) y[t * N + r] = horizontal_sum(acc[r][t]) + (b ? b[r] : 0.f);
}

// Every token of the step against R weight rows (in L1 after the first token block).
template <int R>
CAI_AVX2 void rows_block(const float* x, int64_t M, const float* w, const float* b, int64_t K, float* y, int64_t N) {
  int64_t t = 0;
  for (; t + kTokens <= M; t += kTokens) dot_block<R, kTokens>(x + t * K, w, b, K, y + t * N, N);
  if (M - t == 2) dot_block<R, 2>(x + t * K, w, b, K, y + t * N, N);
  if (M - t == 1) dot_block<R, 1>(x + t * K, w, b, K, y + t * N, N);
}

CAI_AVX2 void linear_avx2(const float* x, int64_t M, int64_t K, const float* w, const float* b, int64_t N, float* y) {
  const int64_t blocks = (N + kRows - 1) / kRows;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < blocks; ++i) {
    const int64_t n = i * kRows;
    const float* wn = w + n * K;
    const float* bn = b ? b + n : nullptr;
    switch (std::min(kRows, N - n)) {
      case 4: rows_block<4>(x, M, wn, bn, K, y + n, N); break;
      case 3: rows_block<3>(x, M, wn, bn, K, y + n, N); break;
      case 2: rows_block<2>(x, M, wn, bn, K, y + n, N); break;
      default: rows_block<1>(x, M, wn, bn, K, y + n, N); break;
    }
  }
}

}  // namespace

bool linear_f32_available() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

void linear_f32(f32_array x, f32_array weight, std::optional<f32_array> bias, f32_out out) {
  if (!linear_f32_available()) throw std::runtime_error("linear_f32: this CPU lacks AVX2 and FMA; use torch's GEMM");
  check_ndim(x, 2, "x");
  check_ndim(weight, 2, "weight");
  check_ndim(out, 2, "out");
  const int64_t M = x.shape(0), K = x.shape(1), N = weight.shape(0);
  check_dim(weight, 1, K, "weight");
  check_dim(out, 0, M, "out");
  check_dim(out, 1, N, "out");
  if (K % kLanes)
    throw std::invalid_argument("linear_f32: in_features must be a multiple of 8, got " + std::to_string(K));
  if (!(out.flags() & py::array::c_style)) throw std::invalid_argument("out: must be contiguous");
  if (bias) {
    check_ndim(*bias, 1, "bias");
    check_dim(*bias, 0, N, "bias");
  }
  const float* b = bias ? bias->data() : nullptr;
  float* y = out.mutable_data();
  py::gil_scoped_release release;
  linear_avx2(x.data(), M, K, weight.data(), b, N, y);
}
