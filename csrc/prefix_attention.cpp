// Cascade attention's shared part on CPU: every query row of a step against the same prefix blocks (a few-shot
// prefix, or the prompt of n samples), each K/V row read once per 32 query rows instead of gathered, widened to
// fp32 and multiplied by BLAS once per layer and step.
//
// Per (KV head, 32 query rows): scores S^T = K Q^T on AMX tiles (bf16 products are exact in fp32; a 16-row A tile
// is one 16-token cache block read in place, the queries packed as the VNNI B operand), 32 keys at a time; in
// that orientation a 16-float vector holds one key for 16 queries, so the online softmax (fp32: max, sum, LSE) is
// lane-wise. The probabilities stay fp32 and meet V in fp32 FMAs (V widened from bf16 in registers), 4 query rows
// x head_dim in registers at a time. Outputs: each row's normalised partial output and its log-sum-exp, to merge
// with the sequence's own part.
#include "prefix_attention.h"

#include <cmath>
#include <limits>
#include <vector>

#include "bf16_tiles.h"

using namespace bf16_tiles;

namespace {

constexpr int64_t kQueries = 32;  // query rows per task: one 2 x 2 block of score tiles with 32 keys
constexpr int64_t kBlock = 16;    // tokens per cache block this kernel takes (one A tile)

CAI_AMX inline __m512 widen_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

struct Shapes {
  int64_t R, H, D, KV, G, P;
};

// One thread's working buffers for its tasks.
struct Scratch {
  Buffer<float> scores, acc;
  Buffer<uint16_t> packed, p_split;
  Buffer<uint32_t> v_pairs;
  explicit Scratch(int64_t D)
      : scores(zeroed<float>(2 * kBlock * kQueries)), acc(zeroed<float>(kQueries * D)),
        packed(zeroed<uint16_t>(kQueries * D)), p_split(zeroed<uint16_t>(2 * kQueries * 2 * kBlock)),
        v_pairs(zeroed<uint32_t>(kBlock * D)) {}
};

// acc += P V for the chunk's keys, on tiles: P (fp32, [keys, queries] in `scores`, relative to each row's final
// max, so the running outputs never need rescaling) split into bf16 hi + lo parts (P = hi + lo to 2^-17 relative:
// the products keep fp32-grade probabilities), as the A operand [32 queries, 32 keys]; V's keys paired (VNNI) as
// the B operand, 16 dims per tile. Each 16-dim slice of acc is loaded and stored once per chunk.
CAI_AMX void probabilities_times_v(float* scores, int64_t keys, const uint16_t* v, const int32_t* blocks, int64_t h,
                                   const Shapes& s, float* acc, uint16_t* p_split, uint32_t* v_pairs) {
  const int64_t D = s.D, kv_row = s.KV * s.D, block_elems = kBlock * kv_row;
  for (int64_t t = keys; t < 2 * kBlock; ++t)  // keys past the end weigh nothing
    std::memset(scores + t * kQueries, 0, kQueries * sizeof(float));
  // P rows (a query's 32 keys) gathered down the score columns, split hi / lo: [2][32 rows][32 keys] bf16
  const __m512i down = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32(int(kQueries)));
  for (int64_t j = 0; j < kQueries; ++j)
    for (int64_t t0 = 0; t0 < 2 * kBlock; t0 += 16) {
      const __m512 p = _mm512_i32gather_ps(down, scores + t0 * kQueries + j, 4);
      const __m256bh hi = _mm512_cvtneps_pbh(p);
      const __m512 hi_f = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)hi), 16));
      const __m256bh lo = _mm512_cvtneps_pbh(_mm512_sub_ps(p, hi_f));
      _mm256_storeu_si256((__m256i*)(p_split + j * 32 + t0), (__m256i)hi);
      _mm256_storeu_si256((__m256i*)(p_split + kQueries * 32 + j * 32 + t0), (__m256i)lo);
    }
  // V's 32 keys as 16 key pairs per row, 16 dims per tile: v_pairs[D / 16][16 pairs][16 dims] (32-bit pairs)
  auto row = [&](int64_t t) {  // past the end: any finite row (its weight is 0)
    return t < keys ? v + blocks[t / kBlock] * block_elems + (t % kBlock) * kv_row + h * D : v + blocks[0] * block_elems;
  };
  for (int64_t pair = 0; pair < kBlock; ++pair) {
    const uint16_t *v0 = row(2 * pair), *v1 = row(2 * pair + 1);
    for (int64_t d = 0; d < D; d += 16) {
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(v0 + d)));
      const __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(v1 + d)));
      _mm512_storeu_si512(v_pairs + (d / 16) * 256 + pair * 16, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  }
  if (!use_amx) {  // VDPBF16PS: the same products through the vector tile emulation
    for (int part = 0; part < 2; ++part)
      for (int64_t d = 0; d < D; d += 16)
        tile_2x1(p_split + part * kQueries * 32, 64, 64, v_pairs + (d / 16) * 256, 0, 64, 1024, 1, acc + d, D * 4,
                 kContiguous, true);
    return;
  }
  const int64_t ldc = D * 4;
  _tile_loadd(4, p_split, 64);                              // hi, rows 0-15 and 16-31
  _tile_loadd(5, p_split + 16 * 32, 64);
  _tile_loadd(6, p_split + kQueries * 32, 64);              // lo
  _tile_loadd(7, p_split + kQueries * 32 + 16 * 32, 64);
  for (int64_t d = 0; d < D; d += 16) {
    char* c = reinterpret_cast<char*>(acc + d);
    _tile_loadd(0, c, ldc);
    _tile_loadd(1, c + 16 * ldc, ldc);
    _tile_loadd(2, v_pairs + (d / 16) * 256, 64);
    _tile_dpbf16ps(0, 4, 2);
    _tile_dpbf16ps(1, 5, 2);
    _tile_dpbf16ps(0, 6, 2);
    _tile_dpbf16ps(1, 7, 2);
    _tile_stored(0, c, ldc);
    _tile_stored(1, c + 16 * ldc, ldc);
  }
}

// The same for a decoding sequence's few query rows, in fp32 FMAs: acc[r0 + r] = acc[r0 + r] * alpha + sum over the
// chunk's keys t of p[t][r0 + r] V[t], for Rows rows: Rows x 64 accumulators stay in registers (compile-time
// counts, so the compiler never spills them to the stack). Cheaper than tiles of 32 rows when 4 or fewer are real.
template <int Rows>
CAI_AMX inline void few_rows_times_v(const float* scores, const float* alphas, const uint16_t* v,
                                          const int32_t* blocks, int64_t keys, int64_t h, const Shapes& s, int64_t r0,
                                          float* acc) {
  const int64_t D = s.D, kv_row = s.KV * s.D, block_elems = kBlock * kv_row;
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    const int nd = D - d0 >= 64 ? 4 : int((D - d0) / 16);  // head_dim is a multiple of 32: 4 or 2
    __m512 a[Rows][4];
    for (int r = 0; r < Rows; ++r) {
      const __m512 alpha = _mm512_set1_ps(alphas[r0 + r]);
      for (int c = 0; c < 4; ++c)
        a[r][c] = c < nd ? _mm512_mul_ps(_mm512_loadu_ps(acc + (r0 + r) * D + d0 + 16 * c), alpha) : _mm512_setzero_ps();
    }
    for (int64_t t = 0; t < keys; ++t) {
      const uint16_t* vt = v + blocks[t / kBlock] * block_elems + (t % kBlock) * kv_row + h * D + d0;
      __m512 vv[4];
      for (int c = 0; c < 4; ++c) vv[c] = c < nd ? widen_bf16(vt + 16 * c) : _mm512_setzero_ps();
      for (int r = 0; r < Rows; ++r) {
        const __m512 p = _mm512_set1_ps(scores[t * kQueries + r0 + r]);
        for (int c = 0; c < 4; ++c) a[r][c] = _mm512_fmadd_ps(p, vv[c], a[r][c]);
      }
    }
    for (int r = 0; r < Rows; ++r)
      for (int c = 0; c < nd; ++c) _mm512_storeu_ps(acc + (r0 + r) * D + d0 + 16 * c, a[r][c]);
  }
}

// One task: KV head h, query rows [i0, i0 + n) of the head's R * G rows (row i = sequence i / G, head h * G + i % G)
// against the first `keys` tokens of `blocks`. n <= 16 (a decoding sequence's G heads) computes half the tiles.
CAI_AMX void task(const uint16_t* q, const uint16_t* k, const uint16_t* v, const int32_t* blocks, int64_t n_keys,
                  const Shapes& s, float scale, int64_t h, int64_t i0, int64_t n, float* out, float* lse,
                  Scratch& scratch) {
  const int64_t D = s.D, KV = s.KV, G = s.G, kv_row = KV * D;
  float *scores = scratch.scores.get(), *acc = scratch.acc.get();
  uint16_t *packed = scratch.packed.get(), *p_split = scratch.p_split.get();
  uint32_t* v_pairs = scratch.v_pairs.get();
  // the rows as the VNNI B operand ([2][D / 2][16] pairs); rows past n keep whatever finite values a previous task
  // left (zeros at first): their score lanes are never read
  for (int64_t j = 0; j < n; ++j) {
    const int64_t i = i0 + j;
    const uint16_t* row = q + ((i / G) * s.H + h * G + i % G) * D;
    uint16_t* dst = packed + (j / 16) * D * 16 + (j % 16) * 2;
    for (int64_t c = 0; c < D; c += 2) {
      dst[c * 16] = row[c];
      dst[c * 16 + 1] = row[c + 1];
    }
  }
  std::fill(acc, acc + kQueries * D, 0.f);  // all 32 rows: the tiles accumulate every row
  __m512 m[2], l[2];
  for (int half = 0; half < 2; ++half) {
    m[half] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    l[half] = _mm512_setzero_ps();
  }
  const __m512 sc = _mm512_set1_ps(scale);
  const int64_t block_elems = kBlock * kv_row;
  const int halves = n > 16 ? 2 : 1;
  auto score_chunk = [&](int64_t b) CAI_AMX {  // S^T for keys [16 b, 16 b + 32) into `scores`; returns the key count
    const int64_t keys = std::min<int64_t>(2 * kBlock, n_keys - b * kBlock);
    const uint16_t* k0 = k + blocks[b] * block_elems + h * D;
    const uint16_t* k1 = keys > kBlock ? k + blocks[b + 1] * block_elems + h * D : k0;  // past the end: masked
    if (halves == 2)
      tile_2x2(k0, kv_row * 2, 64, packed, D * 32, 64, 1024, D / 32, scores, kQueries * 4, false, nullptr,
               (k1 - k0) * 2);
    else
      tile_2x1(k0, kv_row * 2, 64, packed, D * 32, 64, 1024, D / 32, scores, kQueries * 4, (k1 - k0) * 2);
    return keys;
  };
  if (n > 4) {
    // two passes over the keys: each row's max score first (scores on tiles cost little), then probabilities
    // relative to it, so the outputs accumulate on tiles without the online softmax's rescaling
    for (int64_t b = 0; b * kBlock < n_keys; b += 2) {
      const int64_t keys = score_chunk(b);
      for (int half = 0; half < halves; ++half)
        for (int64_t t = 0; t < keys; ++t)
          m[half] = _mm512_max_ps(m[half], _mm512_mul_ps(_mm512_loadu_ps(scores + 16 * half + t * kQueries), sc));
    }
    for (int64_t b = 0; b * kBlock < n_keys; b += 2) {
      const int64_t keys = score_chunk(b);
      for (int half = 0; half < 2; ++half)
        for (int64_t t = 0; t < keys; ++t) {
          float* at = scores + 16 * half + t * kQueries;
          const __m512 p = half < halves ? exp_nonpositive16(_mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(at), sc), m[half]))
                                         : _mm512_setzero_ps();  // lanes of no query
          _mm512_storeu_ps(at, p);
          l[half] = _mm512_add_ps(l[half], p);
        }
      probabilities_times_v(scores, keys, v, blocks + b, h, s, acc, p_split, v_pairs);
    }
  } else {
    for (int64_t b = 0; b * kBlock < n_keys; b += 2) {
      const int64_t keys = score_chunk(b);
      // online softmax, 16 queries per vector; scores become probabilities (relative to the new max) in place
      float* col = scores;
      __m512 cm = m[0];
      for (int64_t t = 0; t < keys; ++t) cm = _mm512_max_ps(cm, _mm512_mul_ps(_mm512_loadu_ps(col + t * kQueries), sc));
      const __m512 alpha = exp_nonpositive16(_mm512_sub_ps(m[0], cm));  // first block: exp(-inf) = 0
      __m512 sum = _mm512_mul_ps(l[0], alpha);
      for (int64_t t = 0; t < keys; ++t) {
        const __m512 p = exp_nonpositive16(_mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(col + t * kQueries), sc), cm));
        _mm512_storeu_ps(col + t * kQueries, p);
        sum = _mm512_add_ps(sum, p);
      }
      m[0] = cm;
      l[0] = sum;
      float alphas[16];
      _mm512_storeu_ps(alphas, alpha);
      switch (n) {  // every row at once: V read once per key
        case 4: few_rows_times_v<4>(scores, alphas, v, blocks + b, keys, h, s, 0, acc); break;
        case 3: few_rows_times_v<3>(scores, alphas, v, blocks + b, keys, h, s, 0, acc); break;
        case 2: few_rows_times_v<2>(scores, alphas, v, blocks + b, keys, h, s, 0, acc); break;
        default: few_rows_times_v<1>(scores, alphas, v, blocks + b, keys, h, s, 0, acc);
      }
    }
  }
  float ms[kQueries], ls[kQueries];
  _mm512_storeu_ps(ms, m[0]);
  _mm512_storeu_ps(ms + 16, m[1]);
  _mm512_storeu_ps(ls, l[0]);
  _mm512_storeu_ps(ls + 16, l[1]);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t i = i0 + j, head = (i / G) * s.H + h * G + i % G;
    const float inv = ls[j] > 0.f ? 1.f / ls[j] : 0.f;
    for (int64_t d = 0; d < D; ++d) out[head * D + d] = acc[j * D + d] * inv;
    lse[head] = ls[j] > 0.f ? ms[j] + std::log(ls[j]) : -std::numeric_limits<float>::infinity();
  }
}

CAI_AMX void run(const uint16_t* q, const uint16_t* k, const uint16_t* v, const int32_t* prefix, const Shapes& s,
                 float scale, float* out, float* lse) {
  const int64_t per_head = (s.R * s.G + kQueries - 1) / kQueries, tasks = s.KV * per_head;
#pragma omp parallel if (tasks > 1)
  {
    configure_tiles();
    Scratch scratch(s.D);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t h = t / per_head, i0 = (t % per_head) * kQueries;
      task(q, k, v, prefix, s.P * kBlock, s, scale, h, i0, std::min(kQueries, s.R * s.G - i0), out, lse, scratch);
    }
    release_tiles();
  }
}

// q [R, H, D], the caches [blocks, 16, KV, D], out [R, H, D], lse [R, H]: the shapes both entry points take (head
// groups of at most 32 query heads, so one task's rows fit a 2 x 2 tile block).
Shapes check_operands(const py::array& q, const py::array& k_cache, const py::array& v_cache, const f32_out& out,
                      const f32_out& lse) {
  Shapes s{q.shape(0), q.shape(1), q.shape(2), k_cache.shape(2), 0, 0};
  if (k_cache.shape(1) != kBlock)
    throw std::invalid_argument("k_cache: expected blocks of " + std::to_string(kBlock) + " tokens, got " +
                                std::to_string(k_cache.shape(1)));
  if (s.D % 32) throw std::invalid_argument("q: head_dim must be a multiple of 32, got " + std::to_string(s.D));
  if (s.H % s.KV || s.H / s.KV > kQueries)
    throw std::invalid_argument("q heads must be a multiple of the cache's KV heads, at most 32 per KV head");
  s.G = s.H / s.KV;
  check_dim(k_cache, 3, s.D, "k_cache");
  for (int axis = 0; axis < 4; ++axis) check_dim(v_cache, axis, k_cache.shape(axis), "v_cache");
  for (int axis = 0; axis < 3; ++axis) check_dim(out, axis, q.shape(axis), "out");
  check_ndim(lse, 2, "lse");
  check_dim(lse, 0, s.R, "lse");
  check_dim(lse, 1, s.H, "lse");
  return s;
}

}  // namespace

void prefix_attention(py::array q, py::array k_cache, py::array v_cache, i32_array prefix, float scale, f32_out out,
                      f32_out lse) {
  require_kernels();
  check_ndim(q, 3, "q");
  check_ndim(k_cache, 4, "k_cache");
  check_ndim(prefix, 1, "prefix");
  Shapes s = check_operands(q, k_cache, v_cache, out, lse);
  s.P = prefix.shape(0);
  const int32_t* pp = prefix.data();
  for (int64_t i = 0; i < s.P; ++i)
    if (pp[i] < 0 || pp[i] >= k_cache.shape(0))
      throw std::invalid_argument("prefix[" + std::to_string(i) + "] = " + std::to_string(pp[i]) +
                                  " is not a block of the cache");
  const uint16_t *qp = bf16_buffer(q, {-1, -1, -1}, "q"), *kp = bf16_buffer(k_cache, {-1, -1, -1, -1}, "k_cache"), *vp = bf16_buffer(v_cache, {-1, -1, -1, -1}, "v_cache");
  float *op = out.mutable_data(), *lp = lse.mutable_data();
  py::gil_scoped_release nogil;
  if (s.R > 0 && s.P > 0) run(qp, kp, vp, pp, s, scale, op, lp);
}

namespace {

CAI_AMX void run_decode(const uint16_t* q, const uint16_t* k, const uint16_t* v, const int32_t* tables,
                        const int32_t* lens, int64_t W, int64_t first_block, const Shapes& s, float scale, float* out,
                        float* lse) {
  const int64_t tasks = s.R * s.KV;
#pragma omp parallel if (tasks > 1)
  {
    configure_tiles();
    Scratch scratch(s.D);
#pragma omp for schedule(dynamic, 4)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t b = t / s.KV, h = t % s.KV, n_keys = lens[b] - first_block * kBlock;
      if (n_keys <= 0) {  // no key past first_block: an empty partial (0, -inf)
        for (int64_t g = 0; g < s.G; ++g) {
          const int64_t head = b * s.H + h * s.G + g;
          std::fill(out + head * s.D, out + (head + 1) * s.D, 0.f);
          lse[head] = -std::numeric_limits<float>::infinity();
        }
        continue;
      }
      task(q, k, v, tables + b * W + first_block, n_keys, s, scale, h, b * s.G, s.G, out, lse, scratch);
    }
    release_tiles();
  }
}

}  // namespace

void paged_decode_bf16(py::array q, py::array k_cache, py::array v_cache, i32_array block_tables,
                       i32_array context_lens, float scale, f32_out out, f32_out lse, int64_t first_block) {
  require_kernels();
  check_ndim(q, 3, "q");
  check_ndim(k_cache, 4, "k_cache");
  check_ndim(block_tables, 2, "block_tables");
  const Shapes s = check_operands(q, k_cache, v_cache, out, lse);
  check_dim(block_tables, 0, s.R, "block_tables");
  check_dim(context_lens, 0, s.R, "context_lens");
  if (first_block < 0) throw std::invalid_argument("first_block must be >= 0");
  const int64_t W = block_tables.shape(1), NB = k_cache.shape(0);
  const int32_t *tab = block_tables.data(), *lens = context_lens.data();
  check_block_tables(tab, lens, s.R, W, NB, kBlock, first_block);
  const uint16_t *qp = bf16_buffer(q, {-1, -1, -1}, "q"), *kp = bf16_buffer(k_cache, {-1, -1, -1, -1}, "k_cache"), *vp = bf16_buffer(v_cache, {-1, -1, -1, -1}, "v_cache");
  float *op = out.mutable_data(), *lp = lse.mutable_data();
  py::gil_scoped_release nogil;
  if (s.R > 0) run_decode(qp, kp, vp, tab, lens, W, first_block, s, scale, op, lp);
}

void prefix_attention_tiles(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache, const int32_t* prefix,
                            int64_t P, int64_t R, int64_t H, int64_t D, int64_t KV, float scale, float* out,
                            float* lse) {
  const Shapes s{R, H, D, KV, H / KV, P};
  if (R > 0 && P > 0) run(q, k_cache, v_cache, prefix, s, scale, out, lse);
}

void paged_decode_tiles(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache, const int32_t* tables,
                        const int32_t* lens, int64_t W, int64_t first_block, int64_t R, int64_t H, int64_t D,
                        int64_t KV, float scale, float* out, float* lse) {
  const Shapes s{R, H, D, KV, H / KV, 0};
  if (R > 0) run_decode(q, k_cache, v_cache, tables, lens, W, first_block, s, scale, out, lse);
}
