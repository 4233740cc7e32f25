// fp32 linear layers for the sampling engine's steps on CPUs without bf16 units (where `precision.mode = auto`
// samples in fp32): y = x W^T (+ bias) for the few rows of a decode step, on AVX2 + FMA.
//
// Why not BLAS: torch's fp32 GEMM at a decode step's few rows runs far below both the CPU's FMA rate and its
// memory bandwidth (bench/RESULTS.md, AMD Zen 3), so a step that should stream each weight once costs several
// times that. Here each thread takes a slice of the weight's rows and streams it once: a block of kRows rows (a
// piece of K at a time, at most 4 x 640 floats, in L1) meets every token of the step, kTokens at a time, in 12
// vector accumulators, while the next piece is prefetched.
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
constexpr int64_t kMaxPiece = 640;  // floats of K per pass (see linear_f32_rows)

CAI_AVX2 inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// y[t, r] = x[t, :len] . w[r, :len] (+ b[r]) (+ y[t, r] if accumulate) for R weight rows and T tokens, x and w rows
// `K` apart; len a multiple of kLanes. The fixed-count loops are unrolled by pragma: without it GCC 12 kept acc[][]
// in memory, a store after every FMA (bench/RESULTS.md, thirteenth session: 1.2-1.5x at 16-64 rows).
template <int R, int T>
CAI_AVX2 void dot_block(const float* x, const float* w, const float* b, int64_t K, int64_t len, float* y, int64_t N,
                        bool accumulate) {
  __m256 acc[R][T];
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 8
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  for (int64_t k = 0; k < len; k += kLanes) {
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
    for (int r = 0; r < R; ++r)
      y[t * N + r] = horizontal_sum(acc[r][t]) + (b ? b[r] : 0.f) + (accumulate ? y[t * N + r] : 0.f);
}

// A piece of the weight: `rows` rows of `len` floats, `K` apart.
struct Piece {
  const float* w;
  int64_t rows, len;
};

// Every token of the step against one piece of R weight rows (in L1 after the first token block), while the piece
// after it is fetched into L2, a slice of its cache lines per token block: the weights stream from memory once per
// step, and without this each piece's first token block waited on them (1.12-1.20x on cold weights).
template <int R>
CAI_AVX2 void rows_block(const float* x, int64_t M, int64_t K, Piece piece, Piece next, const float* b, float* y,
                         int64_t N, bool accumulate) {
  const int64_t line_floats = 64 / sizeof(float), row_lines = (next.len + line_floats - 1) / line_floats;
  const int64_t lines = next.rows * row_lines, token_blocks = (M + kTokens - 1) / kTokens;
  const int64_t per_block = (lines + token_blocks - 1) / token_blocks;
  int64_t line = 0, row = 0, column = 0;  // the next line to fetch: `row` of the piece, `column` floats in
  auto fetch_slice = [&] {
    for (const int64_t end = std::min(lines, line + per_block); line < end; ++line) {
      _mm_prefetch(reinterpret_cast<const char*>(next.w + row * K + column), _MM_HINT_T1);
      column += line_floats;
      if (column >= next.len) column = 0, ++row;
    }
  };
  int64_t t = 0;
  for (; t + kTokens <= M; t += kTokens) {
    fetch_slice();
    dot_block<R, kTokens>(x + t * K, piece.w, b, K, piece.len, y + t * N, N, accumulate);
  }
  if (t < M) fetch_slice();
  if (M - t == 2) dot_block<R, 2>(x + t * K, piece.w, b, K, piece.len, y + t * N, N, accumulate);
  if (M - t == 1) dot_block<R, 1>(x + t * K, piece.w, b, K, piece.len, y + t * N, N, accumulate);
}

}  // namespace

CAI_AVX2 void linear_f32_rows(const float* x, int64_t M, int64_t K, const float* w, const float* b, int64_t N, float* y,
                              bool accumulate) {
  // With a token block or more per row block, K goes in pieces of at most kMaxPiece (a row block's piece, 4 x 640
  // floats, and a token block's inputs, 3 x 640, stay in L1 together; the down projection's 1,536 did not) and the
  // next piece is prefetched. With fewer rows the product is bound by memory: the hardware prefetcher streams the
  // rows whole better (both measured on AMD Zen 3: 0.76-0.98x at one row, 1.2-1.5x at 8-32).
  if (M == 0 || N == 0) return;
  const bool streaming = M >= kTokens;
  const int64_t pieces = streaming ? std::max<int64_t>(1, (K + kMaxPiece - 1) / kMaxPiece) : 1;
  const int64_t piece_len = (K / kLanes + pieces - 1) / pieces * kLanes;
  const int64_t blocks = (N + kRows - 1) / kRows;
  auto piece_at = [&](int64_t i, int64_t j) -> Piece {
    const int64_t n = i * kRows, k0 = j * piece_len;
    if (n >= N) return {w, 0, 0};
    return {w + n * K + k0, std::min(kRows, N - n), std::min(piece_len, K - k0)};
  };
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < blocks; ++i) {
    const int64_t n = i * kRows;
    const float* bn = b ? b + n : nullptr;
    for (int64_t j = 0; j < pieces; ++j) {
      const Piece piece = piece_at(i, j);
      const Piece next = !streaming ? Piece{w, 0, 0} : j + 1 < pieces ? piece_at(i, j + 1) : piece_at(i + 1, 0);
      const bool first = j == 0;
      const float* xj = x + j * piece_len;
      switch (piece.rows) {
        case 4: rows_block<4>(xj, M, K, piece, next, first ? bn : nullptr, y + n, N, accumulate || !first); break;
        case 3: rows_block<3>(xj, M, K, piece, next, first ? bn : nullptr, y + n, N, accumulate || !first); break;
        case 2: rows_block<2>(xj, M, K, piece, next, first ? bn : nullptr, y + n, N, accumulate || !first); break;
        default: rows_block<1>(xj, M, K, piece, next, first ? bn : nullptr, y + n, N, accumulate || !first); break;
      }
    }
  }
}

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
  linear_f32_rows(x.data(), M, K, weight.data(), b, N, y, false);
}
