// fp32 attention over the paged cache on AVX2 + FMA, for CPUs that sample in fp32 (no bf16 units), two entry points
// as for the bf16 tiles (tile_attention.cpp):
// - prefix_attention_f32: a cascade's shared part, every query row of a step against the same prefix blocks;
// - paged_decode_f32: each sequence's own blocks for its one decode row per query head.
//
// Why: on AMD Zen 3 the CAI sampling workload (32 conversations behind a 1,500-token few-shot prefix) spent ~40% of
// its steps in attention: the prefix part as a gathered fp32 copy of the blocks and two torch GEMMs with a softmax
// between, the own part in paged_decode's generic loop, which reloads every K/V row for each query row and sums each
// score across the lanes (bench/RESULTS.md).
//
// A task is one KV head's query rows (up to kMaxRows: the G heads of one or more sequences) against a list of blocks
// read in place. Per chunk of up to kChunk keys: the chunk's K rows are transposed once into K^T [D][keys], so the
// scores are a small GEMM in registers (6 rows x 16 keys, keys in the lanes); an online softmax per row (max, exp,
// sum, the running output rescaled once per chunk); then O += P V with V's rows read straight from the cache (6 rows x
// 16 dims). Everything is fp32; each row ends as its normalised output and log-sum-exp, to merge with the rest of a
// cascade.
#include "attention_f32.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "linear_f32.h"
#include "vecmath.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#define CAI_AVX2 __attribute__((target("avx2,fma")))

namespace {

constexpr int64_t kChunk = 64;    // keys per chunk: K^T [D][64] and the scores [rows][64] stay in L1 / L2
constexpr int64_t kMaxRows = 48;  // query rows per task (8 register blocks of 6)
constexpr int64_t kRowBlock = 6;  // rows per register block: 6 x 2 accumulators + 2 loads + a broadcast = 15 registers

struct Shape {
  int64_t H, D, KV, G, BS;
};

// A task: KV heads [h0, h1) and sequences [b0, b0 + nb) against the first n_keys tokens of `blocks`. Its rows, at most
// kMaxRows: per KV head (in turn, chunk by chunk) the G query heads of each sequence; row j of head h0 + i is
// sequence b0 + j / G, query head (h0 + i) G + j % G.
struct Task {
  int64_t h0, h1, b0, nb;
  const int32_t* blocks;
  int64_t n_keys;
};

// One thread's buffers.
struct Scratch {
  std::vector<float> q, scores, acc, k_t, m, l;
  std::vector<int64_t> offsets;  // each key of the chunk: its row's first element in the caches
  explicit Scratch(int64_t D)
      : q(kMaxRows * D), scores(kMaxRows * kChunk), acc(kMaxRows * D), k_t(D * kChunk), m(kMaxRows), l(kMaxRows),
        offsets(kChunk) {}
};

// Keys the thread will read next (the rest of its task after this chunk, or the first chunk of the task it is likely
// to take next), requested into L2 a few cache lines at a time from inside the compute loops. The blocks are scattered
// in a cache that no CPU cache holds and the hardware prefetcher does not see them coming; requested all at once the
// misses fill the queues and the thread waits as if it had loaded them (measured: no gain), paced like this they
// arrive while it computes.
// Where key t of a block list starts in the caches [blocks, BS, KV, D] (the row of all its KV heads).
inline int64_t key_row(const int32_t* blocks, int64_t t, const Shape& s) {
  return (int64_t(blocks[t / s.BS]) * s.BS + t % s.BS) * s.KV * s.D;
}

struct Prefetcher {
  const float *k = nullptr, *v = nullptr;
  const int32_t* blocks = nullptr;
  Shape shape{};
  int64_t key = 0, end = 0, line = 0, lines_per_key = 0, head_offset = 0, row = 0;

  // Aims at keys [first, last) of task t (at nothing for a null t).
  void aim(const float* k_cache, const float* v_cache, const Task* t, const Shape& s, int64_t first, int64_t last) {
    k = k_cache, v = v_cache, shape = s, line = 0;
    key = end = 0;
    if (!t) return;
    blocks = t->blocks, key = first, end = std::min(last, t->n_keys);
    lines_per_key = (t->h1 - t->h0) * s.D / 16, head_offset = t->h0 * s.D;
    if (key < end) row = key_row(blocks, key, s) + head_offset;
  }
  // The next n lines of K and of V.
  CAI_AVX2 void step(int n) {
    for (; n > 0 && key < end; --n) {
      _mm_prefetch(reinterpret_cast<const char*>(k + row + line * 16), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(v + row + line * 16), _MM_HINT_T1);
      if (++line == lines_per_key && ++key < end) line = 0, row = key_row(blocks, key, shape) + head_offset;
    }
  }
};

CAI_AVX2 inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)), u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)), u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0)), u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0)), u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// K^T [D][padded] of the chunk's `keys` rows k + offsets[t] (padded to a multiple of 16 with zero columns), 8 x 8 at
// a time.
CAI_AVX2 void transpose_keys(const float* k, const int64_t* offsets, int64_t keys, int64_t padded, int64_t D, float* k_t,
                             Prefetcher& ahead) {
  for (int64_t t0 = 0; t0 < padded; t0 += 8)
    for (int64_t d0 = 0; d0 < D; d0 += 8) {
      ahead.step(2);
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = t0 + i < keys ? _mm256_loadu_ps(k + offsets[t0 + i] + d0) : _mm256_setzero_ps();
      transpose8(r);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(k_t + (d0 + i) * padded + t0, r[i]);
    }
}

// scores[r][t0 .. t0 + 16) = q[r] . K^T[:, t0 .. t0 + 16) for Rows rows.
template <int Rows>
CAI_AVX2 void score_block(const float* q, int64_t D, const float* k_t, int64_t padded, int64_t t0, float* scores) {
  __m256 lo[Rows], hi[Rows];  // two arrays, not one [Rows][2]: GCC 12 kept that one in memory, a store per FMA
  #pragma GCC unroll 8
  for (int r = 0; r < Rows; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m256 k0 = _mm256_loadu_ps(k_t + d * padded + t0), k1 = _mm256_loadu_ps(k_t + d * padded + t0 + 8);
    #pragma GCC unroll 8
    for (int r = 0; r < Rows; ++r) {
      const __m256 qr = _mm256_broadcast_ss(q + r * D + d);
      lo[r] = _mm256_fmadd_ps(qr, k0, lo[r]);
      hi[r] = _mm256_fmadd_ps(qr, k1, hi[r]);
    }
  }
  #pragma GCC unroll 8
  for (int r = 0; r < Rows; ++r) {
    _mm256_storeu_ps(scores + r * kChunk + t0, lo[r]);
    _mm256_storeu_ps(scores + r * kChunk + t0 + 8, hi[r]);
  }
}

// acc[r][d0 .. d0 + 16) += sum over the chunk's keys t of p[r][t] V[t][d0 .. d0 + 16) (V[t] at v + offsets[t]), for
// Rows rows.
template <int Rows>
CAI_AVX2 void values_block(const float* p, const float* v, const int64_t* offsets, int64_t keys, int64_t d0, int64_t D,
                           float* acc, Prefetcher& ahead) {
  __m256 lo[Rows], hi[Rows];
  #pragma GCC unroll 8
  for (int r = 0; r < Rows; ++r) {
    lo[r] = _mm256_loadu_ps(acc + r * D + d0);
    hi[r] = _mm256_loadu_ps(acc + r * D + d0 + 8);
  }
  for (int64_t t = 0; t < keys; ++t) {
    ahead.step(1);
    const __m256 v0 = _mm256_loadu_ps(v + offsets[t] + d0), v1 = _mm256_loadu_ps(v + offsets[t] + d0 + 8);
    #pragma GCC unroll 8
    for (int r = 0; r < Rows; ++r) {
      const __m256 pr = _mm256_broadcast_ss(p + r * kChunk + t);
      lo[r] = _mm256_fmadd_ps(pr, v0, lo[r]);
      hi[r] = _mm256_fmadd_ps(pr, v1, hi[r]);
    }
  }
  #pragma GCC unroll 8
  for (int r = 0; r < Rows; ++r) {
    _mm256_storeu_ps(acc + r * D + d0, lo[r]);
    _mm256_storeu_ps(acc + r * D + d0 + 8, hi[r]);
  }
}

// Calls f.template operator()<Rows>(first row) for each register block of `rows` rows: 6 at a time, then the rest.
template <typename F>
inline void by_row_blocks(int64_t rows, F&& f) {
  int64_t r = 0;
  for (; r + kRowBlock <= rows; r += kRowBlock) f(std::integral_constant<int, 6>{}, r);
  switch (rows - r) {
    case 5: f(std::integral_constant<int, 5>{}, r); break;
    case 4: f(std::integral_constant<int, 4>{}, r); break;
    case 3: f(std::integral_constant<int, 3>{}, r); break;
    case 2: f(std::integral_constant<int, 2>{}, r); break;
    case 1: f(std::integral_constant<int, 1>{}, r); break;
    default: break;
  }
}

CAI_AVX2 void run_task(const float* q, const float* k, const float* v, const Task& task, const Shape& s, float scale,
                       float* out, float* lse, Scratch& scratch, const Task* next_task) {
  const int64_t D = s.D, per_head = task.nb * s.G, rows = (task.h1 - task.h0) * per_head;
  auto head = [&](int64_t j) {
    const int64_t h = task.h0 + j / per_head, i = j % per_head;
    return (task.b0 + i / s.G) * s.H + h * s.G + i % s.G;
  };
  float *qs = scratch.q.data(), *scores = scratch.scores.data(), *acc = scratch.acc.data(), *k_t = scratch.k_t.data();
  float *m = scratch.m.data(), *l = scratch.l.data();
  int64_t* offsets = scratch.offsets.data();
  Prefetcher ahead;
  for (int64_t j = 0; j < rows; ++j) {  // the scale folded into the queries once
    const float* src = q + head(j) * D;
    for (int64_t d = 0; d < D; ++d) qs[j * D + d] = src[d] * scale;
  }
  std::fill(acc, acc + rows * D, 0.f);
  std::fill(m, m + rows, -std::numeric_limits<float>::infinity());
  std::fill(l, l + rows, 0.f);
  for (int64_t t0 = 0; t0 < task.n_keys; t0 += kChunk) {
    const int64_t keys = std::min(kChunk, task.n_keys - t0), padded = (keys + 15) / 16 * 16;
    for (int64_t t = 0; t < keys; ++t) offsets[t] = key_row(task.blocks, t0 + t, s);
    // while this chunk computes: the next one, or after the last the first of the task this thread will likely
    // take next (a decode step's prefix attention 2.0 -> 1.6 ms; own blocks of 128 keys 0.87 -> 0.56 ms, paced; 30
    // layers' caches in turn)
    if (t0 + kChunk < task.n_keys)
      ahead.aim(k, v, &task, s, t0 + kChunk, t0 + 2 * kChunk);
    else
      ahead.aim(k, v, next_task, s, 0, kChunk);
    for (int64_t h = task.h0; h < task.h1; ++h) {
      const int64_t r0 = (h - task.h0) * per_head;  // this head's rows
      float *qh = qs + r0 * D, *acc_h = acc + r0 * D, *mh = m + r0, *lh = l + r0;
      transpose_keys(k + h * D, offsets, keys, padded, D, k_t, ahead);
      by_row_blocks(per_head, [&](auto n, int64_t r) {
        for (int64_t c = 0; c < padded; c += 16)
          score_block<decltype(n)::value>(qh + r * D, D, k_t, padded, c, scores + r * kChunk);
      });
      for (int64_t j = 0; j < per_head; ++j) {  // online softmax: probabilities relative to the new max, in place
        float* sj = scores + j * kChunk;
        float top = mh[j];
#pragma omp simd reduction(max : top)
        for (int64_t t = 0; t < keys; ++t) top = sj[t] > top ? sj[t] : top;  // a serial max chain is slow
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < keys; ++t) {
          sj[t] = exp_nonpositive(sj[t] - top);
          sum += sj[t];
        }
        const float alpha = exp_nonpositive(mh[j] - top);  // the first chunk: exp(-inf) = 0, acc and l are 0
        lh[j] = lh[j] * alpha + sum;
        mh[j] = top;
        if (alpha != 1.f)
          for (int64_t d = 0; d < D; ++d) acc_h[j * D + d] *= alpha;
      }
      by_row_blocks(per_head, [&](auto n, int64_t r) {
        for (int64_t d0 = 0; d0 < D; d0 += 16)
          values_block<decltype(n)::value>(scores + r * kChunk, v + h * D, offsets, keys, d0, D, acc_h + r * D, ahead);
      });
    }
  }
  for (int64_t j = 0; j < rows; ++j) {  // no key at all (an own part past its context): an empty partial (0, -inf)
    const float inv = l[j] > 0.f ? 1.f / l[j] : 0.f;
    for (int64_t d = 0; d < D; ++d) out[head(j) * D + d] = acc[j * D + d] * inv;
    lse[head(j)] = l[j] > 0.f ? m[j] + std::log(l[j]) : -std::numeric_limits<float>::infinity();
  }
}

inline int64_t thread_count() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

void run(const float* q, const float* k, const float* v, const std::vector<Task>& tasks, const Shape& s, float scale,
         float* out, float* lse) {
  const int64_t n_tasks = int64_t(tasks.size());
#pragma omp parallel if (n_tasks > 1)
  {
    Scratch scratch(s.D);
    const int64_t threads = thread_count();  // tasks go out in order: a thread's next is about this many ahead
#pragma omp for schedule(dynamic)
    for (int64_t i = 0; i < n_tasks; ++i)
      run_task(q, k, v, tasks[i], s, scale, out, lse, scratch, i + threads < n_tasks ? &tasks[i + threads] : nullptr);
  }
}

// A cache as it is (float32, C-contiguous): a converted copy of a whole cache per call would cost more than the
// attention, and a bf16 cache's bit patterns converted as integers would be garbage.
const float* cache_buffer(const py::array& cache, const char* name) {
  if (!cache.dtype().is(py::dtype::of<float>()) || !(cache.flags() & py::array::c_style))
    throw std::invalid_argument(std::string(name) + ": expected a C-contiguous float32 array, got dtype " +
                                std::string(py::str(cache.dtype())));
  return static_cast<const float*>(cache.data());
}

// The shapes of q [R, H, D], the caches [blocks, BS, KV, D] (float32, C-contiguous), out [R, H, D] and lse [R, H].
Shape check_operands(const f32_array& q, const py::array& k_cache, const py::array& v_cache, const f32_out& out,
                     const f32_out& lse) {
  if (!linear_f32_available()) throw std::runtime_error("attention_f32: this CPU lacks AVX2 and FMA; use torch");
  cache_buffer(k_cache, "k_cache");
  cache_buffer(v_cache, "v_cache");
  check_ndim(q, 3, "q");
  check_ndim(k_cache, 4, "k_cache");
  check_ndim(v_cache, 4, "v_cache");
  const Shape s{q.shape(1), q.shape(2), k_cache.shape(2), 0, k_cache.shape(1)};
  if (s.D % 16) throw std::invalid_argument("q: head_dim must be a multiple of 16, got " + std::to_string(s.D));
  if (s.KV < 1 || s.H % s.KV || s.H / s.KV > kMaxRows)
    throw std::invalid_argument("q: heads must be a multiple of the cache's KV heads, at most " +
                                std::to_string(kMaxRows) + " per KV head");
  check_dim(k_cache, 3, s.D, "k_cache");
  for (int axis = 0; axis < 4; ++axis) check_dim(v_cache, axis, k_cache.shape(axis), "v_cache");
  for (int axis = 0; axis < 3; ++axis) check_dim(out, axis, q.shape(axis), "out");
  if (!(out.flags() & py::array::c_style)) throw std::invalid_argument("out: must be contiguous");
  check_ndim(lse, 2, "lse");
  check_dim(lse, 0, q.shape(0), "lse");
  check_dim(lse, 1, s.H, "lse");
  if (!(lse.flags() & py::array::c_style)) throw std::invalid_argument("lse: must be contiguous");
  return {s.H, s.D, s.KV, s.H / s.KV, s.BS};
}

}  // namespace

void prefix_attention_f32_rows(const float* q, const float* k_cache, const float* v_cache, const int32_t* prefix,
                               int64_t P, int64_t R, int64_t H, int64_t D, int64_t KV, int64_t BS, float scale,
                               float* out, float* lse) {
  if (R == 0) return;
  // a task per KV head and group of whole sequences (at most kMaxRows rows), split evenly: many rows meet each
  // prefix key while it is in cache, and the threads share each head's stream of keys
  const Shape s{H, D, KV, H / KV, BS};
  const int64_t per_task = std::max<int64_t>(1, kMaxRows / s.G), n_split = (R + per_task - 1) / per_task;
  std::vector<Task> tasks;
  for (int64_t h = 0; h < KV; ++h)
    for (int64_t i = 0; i < n_split; ++i) {
      const int64_t b0 = R * i / n_split, b1 = R * (i + 1) / n_split;
      tasks.push_back({h, h + 1, b0, b1 - b0, prefix, P * BS});
    }
  run(q, k_cache, v_cache, tasks, s, scale, out, lse);
}

void paged_decode_f32_rows(const float* q, const float* k_cache, const float* v_cache, const int32_t* tables,
                           const int32_t* lens, int64_t W, int64_t first_block, int64_t B, int64_t H, int64_t D,
                           int64_t KV, int64_t BS, float scale, float* out, float* lse) {
  // a task per sequence and as many KV heads as kMaxRows rows allow (all of them, for usual shapes): each of its
  // blocks is read whole, in order, while its heads take turns chunk by chunk
  const Shape s{H, D, KV, H / KV, BS};
  const int64_t heads_per_task = std::max<int64_t>(1, kMaxRows / s.G);
  std::vector<Task> tasks;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < KV; h += heads_per_task)
      tasks.push_back({h, std::min(KV, h + heads_per_task), b, 1, tables + b * W + first_block,
                       std::max<int64_t>(0, lens[b] - first_block * BS)});
  run(q, k_cache, v_cache, tasks, s, scale, out, lse);
}

void prefix_attention_f32(f32_array q, py::array k_cache, py::array v_cache, i32_array prefix, float scale,
                          f32_out out, f32_out lse) {
  const Shape s = check_operands(q, k_cache, v_cache, out, lse);
  check_ndim(prefix, 1, "prefix");
  const int64_t R = q.shape(0), P = prefix.shape(0);
  const int32_t* blocks = prefix.data();
  for (int64_t i = 0; i < P; ++i)
    if (blocks[i] < 0 || blocks[i] >= k_cache.shape(0))
      throw std::invalid_argument("prefix[" + std::to_string(i) + "] = " + std::to_string(blocks[i]) +
                                  " is not a block of the cache");
  float *op = out.mutable_data(), *lp = lse.mutable_data();
  py::gil_scoped_release nogil;
  prefix_attention_f32_rows(q.data(), static_cast<const float*>(k_cache.data()),
                            static_cast<const float*>(v_cache.data()), blocks, P, R, s.H, s.D, s.KV, s.BS, scale, op, lp);
}

void paged_decode_f32(f32_array q, py::array k_cache, py::array v_cache, i32_array block_tables,
                      i32_array context_lens, float scale, f32_out out, f32_out lse, int64_t first_block) {
  const Shape s = check_operands(q, k_cache, v_cache, out, lse);
  check_ndim(block_tables, 2, "block_tables");
  const int64_t B = q.shape(0), W = block_tables.shape(1);
  check_dim(block_tables, 0, B, "block_tables");
  check_ndim(context_lens, 1, "context_lens");
  check_dim(context_lens, 0, B, "context_lens");
  if (first_block < 0) throw std::invalid_argument("first_block must be >= 0");
  const int32_t *tables = block_tables.data(), *lens = context_lens.data();
  check_block_tables(tables, lens, B, W, k_cache.shape(0), s.BS, first_block);
  float *op = out.mutable_data(), *lp = lse.mutable_data();
  py::gil_scoped_release nogil;
  paged_decode_f32_rows(q.data(), static_cast<const float*>(k_cache.data()), static_cast<const float*>(v_cache.data()),
                        tables, lens, W, first_block, B, s.H, s.D, s.KV, s.BS, scale, op, lp);
}
