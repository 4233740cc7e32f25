// Attention over the paged bf16 cache on AMX tiles (CPU), two entry points:
// - prefix_attention: a cascade's shared part, every query row of a step against the same prefix blocks (a
//   few-shot prefix, the prompt of n samples), each K/V row read once per task of up to 128 query rows;
// - paged_attention_bf16: each sequence's own blocks, for its decode row or its causal prefill chunk.
//
// Per (KV head, up to 4 groups of 32 query rows, a range of keys): scores S^T = K Q^T on AMX tiles (bf16 products
// are exact in fp32; a 16-row A tile is one 16-token cache block read in place, the queries packed as the VNNI B
// operand), 32 keys at a time; in that orientation a 16-float vector holds one key for 16 queries, so the softmax
// (fp32: max, sum, LSE) is lane-wise, and two consecutive key rows interleave straight into the VNNI B operand of
// O^T += V^T P^T, whose A operand V^T is packed once per chunk for all the task's groups. Decoding sequences' few
// rows (at most 4 per KV head) take an online softmax and P V in fp32 FMAs instead. Outputs: each row's normalised
// output and its log-sum-exp, to merge with the other part of a cascade.
#include "tile_attention.h"

#include <cmath>
#include <limits>
#include <vector>

#include "bf16_tiles.h"

using namespace bf16_tiles;

namespace {

constexpr int64_t kQueries = 32;  // query rows per task: one 2 x 2 block of score tiles with 32 keys
constexpr int64_t kBlock = 16;    // tokens per cache block this kernel takes (one A tile)

struct Shapes {
  int64_t R, H, D, KV, G, P;
};

constexpr int64_t kMaxSplits = 32;  // key ranges of one row task (few rows, many threads)
constexpr int64_t kGroups = 4;   // 32-row groups one task scores against each key chunk (V^T packed once for all)

// One thread's working buffers for its tasks.
struct Scratch {
  Buffer<float> scores, acc;
  Buffer<uint16_t> packed;
  Buffer<uint32_t> p_pairs, v_t;
  explicit Scratch(int64_t D)
      : scores(zeroed<float>(kGroups * 2 * kBlock * kQueries)), acc(zeroed<float>(kGroups * kQueries * D)),
        packed(zeroed<uint16_t>(kGroups * kQueries * D)), p_pairs(zeroed<uint32_t>(2 * 2 * kBlock * 16)),
        v_t(zeroed<uint32_t>(D * kBlock)) {}
};

// V^T of a 32-key chunk as the A operand of O^T += V^T P^T: v_t[D rows][16 key pairs] (a pair = keys 2p, 2p + 1 of
// one dim), each 16-dim slice one transpose of the keys' pair words. Keys past the end: any finite row (weight 0).
CAI_AMX void pack_v_transposed(const uint16_t* v, const int32_t* blocks, int64_t keys, int64_t h, const Shapes& s,
                               uint32_t* v_t) {
  const int64_t D = s.D, kv_row = s.KV * s.D, block_elems = kBlock * kv_row;
  auto row = [&](int64_t t) {
    return t < keys ? v + blocks[t / kBlock] * block_elems + (t % kBlock) * kv_row + h * D : v + blocks[0] * block_elems;
  };
  for (int64_t d = 0; d < D; d += 16) {
    __m512i r[16];
    for (int64_t pair = 0; pair < kBlock; ++pair) {
      const __m512i even = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(row(2 * pair) + d)));
      const __m512i odd = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(row(2 * pair + 1) + d)));
      r[pair] = _mm512_or_si512(even, _mm512_slli_epi32(odd, 16));
    }
    transpose16(r);
    for (int i = 0; i < 16; ++i) _mm512_storeu_si512(v_t + (d + i) * 16, r[i]);
  }
}

// acc (O^T [D][32 queries], fp32) += V^T P^T for one chunk: P^T (fp32 [keys][queries] in `scores`, relative to each
// row's final max, so the running outputs never need rescaling) as the B operand, its key pairs interleaved and
// split into bf16 hi + lo parts (P = hi + lo to 2^-17 relative: the products keep fp32-grade probabilities):
// p_pairs[part][16-query half][16 pairs][16]; V^T from pack_v_transposed as A, 32 dims per tile block.
CAI_AMX void probabilities_times_v(const float* scores, const uint32_t* v_t, int64_t D, float* acc, uint32_t* p_pairs) {
  for (int64_t pair = 0; pair < kBlock; ++pair)
    for (int half = 0; half < 2; ++half) {
      const __m512 even = _mm512_loadu_ps(scores + 2 * pair * kQueries + 16 * half);
      const __m512 odd = _mm512_loadu_ps(scores + (2 * pair + 1) * kQueries + 16 * half);
      const __m512i even_hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(even));
      const __m512i odd_hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(odd));
      const __m512 even_lo = _mm512_sub_ps(even, _mm512_castsi512_ps(_mm512_slli_epi32(even_hi, 16)));
      const __m512 odd_lo = _mm512_sub_ps(odd, _mm512_castsi512_ps(_mm512_slli_epi32(odd_hi, 16)));
      const __m512i lo = _mm512_or_si512(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(even_lo)),
                                         _mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(odd_lo)), 16));
      _mm512_storeu_si512(p_pairs + (half * kBlock + pair) * 16, _mm512_or_si512(even_hi, _mm512_slli_epi32(odd_hi, 16)));
      _mm512_storeu_si512(p_pairs + ((2 + half) * kBlock + pair) * 16, lo);
    }
  // k steps: hi then lo against the same V^T rows (a_step 0)
  for (int64_t d = 0; d < D; d += 32)
    tile_2x2(v_t + d * 16, 64, 0, p_pairs, kBlock * 64, 64, 2 * kBlock * 64, 2, acc + d * kQueries, kQueries * 4, true);
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

// A task's query rows: KV head h, rows [i0, i0 + n) of the head's R * G rows (row i = sequence i / G, query head
// h * G + i % G), against the first `n_keys` tokens of `blocks`; results (normalised output, log-sum-exp) at each row's
// head index of out / lse.
struct Rows {
  int64_t h, i0, n;
  int64_t head(const Shapes& s, int64_t j) const {
    const int64_t i = i0 + j;
    return (i / s.G) * s.H + h * s.G + i % s.G;
  }
};

// Rows j of 32-row group `group` as the VNNI B operand ([2][D / 2][16] pairs); rows past n keep whatever finite values
// a previous task left (zeros at first): their score lanes are never read.
inline void pack_queries(const uint16_t* q, const Shapes& s, const Rows& rows, int64_t group, uint16_t* packed) {
  const int64_t D = s.D;
  for (int64_t j = group * kQueries; j < std::min(rows.n, (group + 1) * kQueries); ++j) {
    const uint16_t* row = q + rows.head(s, j) * D;
    uint16_t* dst = packed + ((j % kQueries) / 16) * D * 16 + (j % 16) * 2;
    for (int64_t c = 0; c < D; c += 2) {
      dst[c * 16] = row[c];
      dst[c * 16 + 1] = row[c + 1];
    }
  }
}

// S^T = K Q^T for keys [16 b, 16 b + 32) of `blocks` into scores [32 keys][32 queries] (a 16-row A tile is one cache
// block read in place); `halves` 1 computes the first 16 queries only, and may add to the scores already there.
// Returns the chunk's key count.
CAI_AMX inline int64_t score_chunk(const uint16_t* k, const int32_t* blocks, int64_t b, int64_t n_keys, int64_t h,
                                   const Shapes& s, const uint16_t* packed, int halves, float* scores,
                                   bool accumulate = false) {
  const int64_t D = s.D, kv_row = s.KV * D, block_elems = kBlock * kv_row;
  const int64_t keys = std::min<int64_t>(2 * kBlock, n_keys - b * kBlock);
  const uint16_t* k0 = k + blocks[b] * block_elems + h * D;
  const uint16_t* k1 = keys > kBlock ? k + blocks[b + 1] * block_elems + h * D : k0;  // past the end: masked
  if (halves == 2)
    tile_2x2(k0, kv_row * 2, 64, packed, D * 32, 64, 1024, D / 32, scores, kQueries * 4, false, nullptr, (k1 - k0) * 2);
  else
    tile_2x1(k0, kv_row * 2, 64, packed, D * 32, 64, 1024, D / 32, scores, kQueries * 4, (k1 - k0) * 2, accumulate);
  return keys;
}

// few_rows_task's scores on CPUs without AMX, where score_chunk's tiles run as vector_tiles: 16 lanes of which a
// decode step fills n per head, each head computed on its own (measured on AMD Zen 4: a 32-sequence RL rollout step's
// attention took 0.50 ms of its 1.57 ms layer, more than the q, k, v, o and down products together). Here the keys
// are the lanes instead: per 16-token block and head, one register transpose of the K rows turns them into 16 vectors
// of one key pair each, and each query row of the head takes 16 VDPBF16PS with its pairs broadcast, 16 keys at once.
// The rows' results are staged and transposed into score_chunk's layout, scores[key][lane hh * n + j], every lane
// written (zeros past heads * n). Returns the key count.
CAI_AMX inline int64_t few_rows_scores(const uint16_t* k, const int32_t* blocks, int64_t b, int64_t n_keys, int64_t h0,
                                       int64_t heads, int64_t n, const Shapes& s, const uint16_t* packed,
                                       float* scores) {
  const int64_t D = s.D, kv_row = s.KV * D, block_elems = kBlock * kv_row;
  const int64_t keys = std::min<int64_t>(2 * kBlock, n_keys - b * kBlock);
  alignas(64) float stage[16][16];
  for (int64_t half = 0; half * kBlock < keys; ++half) {
    const uint16_t* block = k + blocks[b + half] * block_elems;  // rows past the last key: finite or not, never read
    std::memset(stage, 0, sizeof stage);
    for (int64_t hh = 0; hh < heads; ++hh) {
      const uint32_t* q_pairs = reinterpret_cast<const uint32_t*>(packed + hh * 16 * D);  // [pair][lane]
      __m512 acc[4];  // n <= kFewRows
      for (int64_t j = 0; j < n; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t c = 0; c < D / 32; ++c) {  // 16 pairs (32 dims) of the head at a time
        __m512i r[16];
        for (int t = 0; t < 16; ++t) r[t] = _mm512_loadu_si512(block + t * kv_row + (h0 + hh) * D + 32 * c);
        transpose16(r);  // r[p] lane t: pair 16 c + p of key t
        for (int64_t j = 0; j < n; ++j) {
          const uint32_t* qj = q_pairs + 16 * 16 * c + hh * n + j;
          for (int p = 0; p < 16; ++p)
            acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)r[p], (__m512bh)_mm512_set1_epi32(int(qj[16 * p])));
        }
      }
      for (int64_t j = 0; j < n; ++j) _mm512_store_ps(stage[hh * n + j], acc[j]);
    }
    __m512i rows[16];
    for (int i = 0; i < 16; ++i) rows[i] = _mm512_load_si512(stage[i]);
    transpose16(rows);  // rows[t] lane i: key t of lane i
    const int64_t valid = std::min<int64_t>(kBlock, keys - half * kBlock);
    for (int64_t t = 0; t < valid; ++t) _mm512_storeu_si512(scores + (half * kBlock + t) * kQueries, rows[t]);
  }
  return keys;
}

// Requests `width` elements from `offset` of each K or V row of the chunk at block b (one head: 2 cache lines for
// head_dim 64; or several heads, or the whole row) while the current chunk computes: the chunks' blocks are
// scattered in the cache, so the hardware prefetcher does not see them coming, and tile loads and widening loads
// straight from memory stalled (a quarter of the kernel's time).
template <_mm_hint Hint = _MM_HINT_T0>
inline void prefetch_chunk(const uint16_t* cache, const int32_t* blocks, int64_t b, int64_t n_keys, const Shapes& s,
                           int64_t offset, int64_t width) {
  if (b * kBlock >= n_keys) return;
  const int64_t kv_row = s.KV * s.D, keys = std::min<int64_t>(2 * kBlock, n_keys - b * kBlock);
  for (int64_t t = 0; t < keys; ++t) {
    const char* row = reinterpret_cast<const char*>(cache + blocks[b + t / kBlock] * kBlock * kv_row +
                                                    (t % kBlock) * kv_row + offset);
    for (int64_t line = 0; line < width * 2; line += 64) _mm_prefetch(row + line, Hint);
  }
}

inline void finish_row(const float* o, int64_t stride, float m, float l, int64_t D, float* out, float* lse) {
  const float inv = l > 0.f ? 1.f / l : 0.f;
  for (int64_t d = 0; d < D; ++d) out[d] = o[d * stride] * inv;
  *lse = l > 0.f ? m + std::log(l) : -std::numeric_limits<float>::infinity();
}

constexpr int64_t kNoMask = INT64_MAX;  // group_task's causal_base when every row sees every key

// Up to kGroups x 32 rows: per 32-key chunk, V^T is packed once for every group, then each group's scores, softmax
// and P V run on tiles. With AMX, two passes over the keys (two_passes): each row's max score first (scores on tiles
// cost little), then probabilities relative to it, so the outputs accumulate on tiles without the online softmax's
// rescaling. Without AMX the scores cost as much as P V (tiles run as vectors), and computing them twice was a
// quarter of the work: one pass, the running outputs rescaled per chunk in fp32. In the
// S^T orientation a 16-float vector holds one key for 16 queries: max, exp and sums are lane-wise.
// causal_base (a prefill chunk's own keys): row i sees keys [0, causal_base + i / G] of the range (its token's
// position); chunks no row of a group sees are skipped.
CAI_AMX void group_task(const uint16_t* q, const uint16_t* k, const uint16_t* v, const int32_t* blocks, int64_t n_keys,
                        const Shapes& s, float scale, const Rows& rows, float* out, float* lse, Scratch& scratch,
                        int64_t causal_base = kNoMask) {
  const int64_t D = s.D, groups = (rows.n + kQueries - 1) / kQueries;
  const bool causal = causal_base != kNoMask;
  float *scores = scratch.scores.get(), *acc = scratch.acc.get();
  uint16_t* packed = scratch.packed.get();
  for (int64_t g = 0; g < groups; ++g) pack_queries(q, s, rows, g, packed + g * kQueries * D);
  std::fill(acc, acc + groups * kQueries * D, 0.f);  // all 32 columns: the tiles accumulate every query
  __m512 m[kGroups][2], l[kGroups][2], last_key[kGroups][2];
  int64_t group_keys[kGroups];  // keys [0, group_keys) reach some row of the group
  for (int64_t g = 0; g < groups; ++g) {
    group_keys[g] = n_keys;
    for (int half = 0; half < 2; ++half) {
      m[g][half] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      l[g][half] = _mm512_setzero_ps();
    }
    if (!causal) continue;
    float limits[kQueries];
    for (int64_t c = 0; c < kQueries; ++c)  // lanes of no row: as the group's last row (their lanes are never read)
      limits[c] = float(causal_base + (rows.i0 + std::min(g * kQueries + c, rows.n - 1)) / s.G);
    last_key[g][0] = _mm512_loadu_ps(limits);
    last_key[g][1] = _mm512_loadu_ps(limits + 16);
    group_keys[g] = std::min<int64_t>(n_keys, int64_t(limits[kQueries - 1]) + 1);
  }
  const int64_t task_keys = group_keys[groups - 1];  // the last group's rows see the most keys
  const __m512 sc = _mm512_set1_ps(scale);
  auto halves_of = [&](int64_t g) { return rows.n - g * kQueries > 16 ? 2 : 1; };
  auto visible = [&](int64_t g, int half, int64_t key) CAI_AMX {  // lanes whose row sees `key`
    return causal ? _mm512_cmp_ps_mask(_mm512_set1_ps(float(key)), last_key[g][half], _CMP_LE_OQ) : __mmask16(0xffff);
  };
  // a chunk's scores (group g, keys from b * kBlock) into probabilities relative to each row's max so far (m), added
  // to its sum (l); zeros for lanes of no query and for keys past the end, which then weigh nothing in P V
  auto to_probabilities = [&](int64_t g, int64_t b, int64_t keys, int halves) CAI_AMX {
    for (int half = 0; half < 2; ++half) {
      for (int64_t t = 0; t < keys; ++t) {
        float* at = scores + 16 * half + t * kQueries;
        const __m512 p = half < halves ? _mm512_maskz_mov_ps(visible(g, half, b * kBlock + t),
                                                             exp_nonpositive16(_mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(at), sc), m[g][half])))
                                       : _mm512_setzero_ps();
        _mm512_storeu_ps(at, p);
        l[g][half] = _mm512_add_ps(l[g][half], p);
      }
      for (int64_t t = keys; t < 2 * kBlock; ++t) _mm512_storeu_ps(scores + 16 * half + t * kQueries, _mm512_setzero_ps());
    }
  };
  if (!use_amx) {  // one pass, an online softmax: see two_passes above
    const __m512 one = _mm512_set1_ps(1.f), minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t b = 0; b * kBlock < task_keys; b += 2) {
      const int64_t keys = std::min<int64_t>(2 * kBlock, n_keys - b * kBlock);
      prefetch_chunk(k, blocks, b + 2, task_keys, s, rows.h * s.D, s.D);
      prefetch_chunk(v, blocks, b + 2, task_keys, s, rows.h * s.D, s.D);
      pack_v_transposed(v, blocks + b, keys, rows.h, s, scratch.v_t.get());
      for (int64_t g = 0; g < groups; ++g) {
        if (b * kBlock >= group_keys[g]) continue;
        const int halves = halves_of(g);
        score_chunk(k, blocks, b, n_keys, rows.h, s, packed + g * kQueries * D, halves, scores);
        __m512 alpha[2] = {one, one};
        for (int half = 0; half < halves; ++half) {
          __m512 top = m[g][half];
          for (int64_t t = 0; t < keys; ++t)
            top = _mm512_mask_max_ps(top, visible(g, half, b * kBlock + t), top,
                                     _mm512_mul_ps(_mm512_loadu_ps(scores + 16 * half + t * kQueries), sc));
          // lanes that have seen a key rescale what they hold (exp(-inf) = 0 the first time); the others hold 0
          const __mmask16 seen = _mm512_cmp_ps_mask(top, minus_inf, _CMP_NEQ_OQ);
          alpha[half] = _mm512_mask_blend_ps(seen, one, exp_nonpositive16(_mm512_sub_ps(m[g][half], top)));
          l[g][half] = _mm512_mul_ps(l[g][half], alpha[half]);
          m[g][half] = top;
        }
        to_probabilities(g, b, keys, halves);
        float* o = acc + g * kQueries * D;  // O^T [D][32 queries]
        for (int64_t d = 0; d < D; ++d)
          for (int half = 0; half < 2; ++half)
            _mm512_storeu_ps(o + d * kQueries + 16 * half,
                             _mm512_mul_ps(_mm512_loadu_ps(o + d * kQueries + 16 * half), alpha[half]));
        probabilities_times_v(scores, scratch.v_t.get(), D, o, scratch.p_pairs.get());
      }
    }
  } else {  // two_passes
    for (int64_t b = 0; b * kBlock < task_keys; b += 2) {
      prefetch_chunk(k, blocks, b + 2, task_keys, s, rows.h * s.D, s.D);
      for (int64_t g = 0; g < groups; ++g) {
        if (b * kBlock >= group_keys[g]) continue;
        const int halves = halves_of(g);
        const int64_t keys = score_chunk(k, blocks, b, n_keys, rows.h, s, packed + g * kQueries * D, halves, scores);
        for (int half = 0; half < halves; ++half)
          for (int64_t t = 0; t < keys; ++t)
            m[g][half] = _mm512_mask_max_ps(m[g][half], visible(g, half, b * kBlock + t), m[g][half],
                                            _mm512_mul_ps(_mm512_loadu_ps(scores + 16 * half + t * kQueries), sc));
      }
    }
    for (int64_t b = 0; b * kBlock < task_keys; b += 2) {
      const int64_t keys = std::min<int64_t>(2 * kBlock, n_keys - b * kBlock);
      if (b == 0) prefetch_chunk(v, blocks, 0, task_keys, s, rows.h * s.D, s.D);
      prefetch_chunk(v, blocks, b + 2, task_keys, s, rows.h * s.D, s.D);  // K of the chunk is still in cache from the first pass
      pack_v_transposed(v, blocks + b, keys, rows.h, s, scratch.v_t.get());
      for (int64_t g = 0; g < groups; ++g) {
        if (b * kBlock >= group_keys[g]) continue;
        const int halves = halves_of(g);
        score_chunk(k, blocks, b, n_keys, rows.h, s, packed + g * kQueries * D, halves, scores);
        to_probabilities(g, b, keys, halves);
        probabilities_times_v(scores, scratch.v_t.get(), D, acc + g * kQueries * D, scratch.p_pairs.get());
      }
    }
  }
  for (int64_t g = 0; g < groups; ++g) {
    float ms[kQueries], ls[kQueries];
    _mm512_storeu_ps(ms, m[g][0]);
    _mm512_storeu_ps(ms + 16, m[g][1]);
    _mm512_storeu_ps(ls, l[g][0]);
    _mm512_storeu_ps(ls + 16, l[g][1]);
    for (int64_t j = g * kQueries; j < std::min(rows.n, (g + 1) * kQueries); ++j) {
      const int64_t head = rows.head(s, j), c = j % kQueries;
      finish_row(acc + g * kQueries * D + c, kQueries, ms[c], ls[c], D, out + head * D, lse + head);
    }
  }
}

constexpr int64_t kFewRows = 4;  // rows per KV head the FMA path takes
constexpr int64_t kHeadsAtOnce = 8;  // KV heads it takes together (their queries packed in Scratch::packed)

// Rows i0 .. i0 + n (n <= kFewRows, a decoding sequence's few query heads) for KV heads [h0, h1) ((h1 - h0) n <= 16, h1 - h0 <= kHeadsAtOnce):
// scores on half the tiles, an online softmax and P V in fp32 FMAs (cheaper than 32-row tiles when so few rows are
// real). All the heads share one 16-lane score vector (head hh's rows in lanes hh n ..): each head's queries sit in
// its own lanes of its B operand, zeros elsewhere, so its K tile adds only to its lanes, and one max / exp / sum
// serves every head. The heads take turns chunk by chunk, so each 16-token block's K and V rows (all heads side
// by side in the cache) are used while in cache, and the next chunk's rows are requested ahead: one head at a time
// read a third of every row and waited on memory most of the time.
CAI_AMX void few_rows_task(const uint16_t* q, const uint16_t* k, const uint16_t* v, const int32_t* blocks,
                           int64_t n_keys, const Shapes& s, float scale, int64_t i0, int64_t n, int64_t h0, int64_t h1,
                           float* out, float* lse, Scratch& scratch) {
  const int64_t D = s.D, heads = h1 - h0;
  float *scores = scratch.scores.get(), *acc = scratch.acc.get();
  uint16_t* packed = scratch.packed.get();  // per head: [D / 2 pairs][16 lanes][2], its rows in its lanes
  std::fill(packed, packed + heads * 16 * D, uint16_t(0));
  for (int64_t hh = 0; hh < heads; ++hh)
    for (int64_t j = 0; j < n; ++j) {
      const uint16_t* row = q + Rows{h0 + hh, i0, n}.head(s, j) * D;
      uint16_t* dst = packed + hh * 16 * D + (hh * n + j) * 2;
      for (int64_t c = 0; c < D; c += 2) {
        dst[c * 16] = row[c];
        dst[c * 16 + 1] = row[c + 1];
      }
    }
  std::fill(acc, acc + 16 * D, 0.f);
  __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), l = _mm512_setzero_ps();
  const __m512 sc = _mm512_set1_ps(scale);
  prefetch_chunk(k, blocks, 0, n_keys, s, h0 * D, heads * D);  // heads h0..h1 side by side in each row
  for (int64_t b = 0; b * kBlock < n_keys; b += 2) {
    prefetch_chunk(v, blocks, b, n_keys, s, h0 * D, heads * D);
    prefetch_chunk(k, blocks, b + 2, n_keys, s, h0 * D, heads * D);
    int64_t keys = 0;
    if (use_amx)
      for (int64_t hh = 0; hh < heads; ++hh)  // S^T for every head's lanes, accumulated
        keys = score_chunk(k, blocks, b, n_keys, h0 + hh, s, packed + hh * 16 * D, 1, scores, hh > 0);
    else
      keys = few_rows_scores(k, blocks, b, n_keys, h0, heads, n, s, packed, scores);
    // online softmax, 16 lanes per vector; scores become probabilities (relative to the new max) in place
    __m512 cm = m;
    for (int64_t t = 0; t < keys; ++t) cm = _mm512_max_ps(cm, _mm512_mul_ps(_mm512_loadu_ps(scores + t * kQueries), sc));
    const __m512 alpha = exp_nonpositive16(_mm512_sub_ps(m, cm));  // first block: exp(-inf) = 0
    __m512 sum = _mm512_mul_ps(l, alpha);
    for (int64_t t = 0; t < keys; ++t) {
      const __m512 p = exp_nonpositive16(_mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(scores + t * kQueries), sc), cm));
      _mm512_storeu_ps(scores + t * kQueries, p);
      sum = _mm512_add_ps(sum, p);
    }
    m = cm;
    l = sum;
    float alphas[16];
    _mm512_storeu_ps(alphas, alpha);
    for (int64_t hh = 0; hh < heads; ++hh) {
      const int64_t h = h0 + hh, r0 = hh * n;
      switch (n) {  // every row of the head at once: V read once per key
        case 4: few_rows_times_v<4>(scores, alphas, v, blocks + b, keys, h, s, r0, acc); break;
        case 3: few_rows_times_v<3>(scores, alphas, v, blocks + b, keys, h, s, r0, acc); break;
        case 2: few_rows_times_v<2>(scores, alphas, v, blocks + b, keys, h, s, r0, acc); break;
        default: few_rows_times_v<1>(scores, alphas, v, blocks + b, keys, h, s, r0, acc);
      }
    }
  }
  float ms[16], ls[16];
  _mm512_storeu_ps(ms, m);
  _mm512_storeu_ps(ls, l);
  for (int64_t hh = 0; hh < heads; ++hh)
    for (int64_t j = 0; j < n; ++j) {
      const int64_t head = Rows{h0 + hh, i0, n}.head(s, j), lane = hh * n + j;
      finish_row(acc + lane * D, 1, ms[lane], ls[lane], D, out + head * D, lse + head);
    }
}

// Tasks: (KV head, up to kGroups x 32 rows, a range of the prefix's key chunks). With few rows (decode steps) the
// keys are split too, so both threads get equal work (9 row tasks on 2 threads left one idle a tenth of the time),
// each split's partial (output, log-sum-exp) kept apart and merged at the end like a cascade's parts.
CAI_AMX void run(const uint16_t* q, const uint16_t* k, const uint16_t* v, const int32_t* prefix, const Shapes& s,
                 float scale, float* out, float* lse) {
  const int64_t rows = s.R * s.G, per_task = rows <= kFewRows ? rows : kGroups * kQueries;
  const int64_t row_tasks = s.KV * ((rows + per_task - 1) / per_task), chunks = (s.P + 1) / 2;
  const int64_t threads = max_threads();
  const int64_t wanted = row_tasks >= 2 * threads ? 1 : (2 * threads + row_tasks - 1) / row_tasks;
  const int64_t splits = std::max<int64_t>(1, std::min({chunks, wanted, kMaxSplits}));
  const int64_t tasks = row_tasks * splits, RH = s.R * s.H;
  std::vector<float> part_out(splits > 1 ? splits * RH * s.D : 0), part_lse(splits > 1 ? splits * RH : 0);
#pragma omp parallel if (tasks > 1)
  {
    configure_tiles();
    Scratch scratch(s.D);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t split = t % splits, row_task = t / splits, per_head = row_tasks / s.KV;
      const int64_t i0 = (row_task % per_head) * per_task;
      const Rows task_rows{row_task / per_head, i0, std::min(per_task, rows - i0)};
      const int64_t c0 = chunks * split / splits, c1 = chunks * (split + 1) / splits;
      const int64_t n_keys = std::min(s.P, 2 * c1) * kBlock - 2 * c0 * kBlock;
      float* o = splits > 1 ? part_out.data() + split * RH * s.D : out;
      float* l = splits > 1 ? part_lse.data() + split * RH : lse;
      if (task_rows.n <= kFewRows)
        few_rows_task(q, k, v, prefix + 2 * c0, n_keys, s, scale, task_rows.i0, task_rows.n, task_rows.h,
                      task_rows.h + 1, o, l, scratch);
      else
        group_task(q, k, v, prefix + 2 * c0, n_keys, s, scale, task_rows, o, l, scratch);
    }
    release_tiles();
    if (splits > 1) {
#pragma omp for schedule(static)
      for (int64_t i = 0; i < RH; ++i) {  // lse-weighted sum of the splits' normalised outputs
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t p = 0; p < splits; ++p) mx = std::max(mx, part_lse[p * RH + i]);
        float total = 0.f, w[kMaxSplits];
        for (int64_t p = 0; p < splits; ++p) total += w[p] = std::exp(part_lse[p * RH + i] - mx);
        for (int64_t d = 0; d < s.D; ++d) {
          float o = 0.f;
          for (int64_t p = 0; p < splits; ++p) o += w[p] * part_out[(p * RH + i) * s.D + d];
          out[i * s.D + d] = o / total;
        }
        lse[i] = mx + std::log(total);
      }
    }
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

// Per sequence b: its newest query_lens[b] tokens (1 without query_lens: decode), rows of q from the sum of the
// earlier ones, over its keys from first_block on, causal among the new tokens.
CAI_AMX void run_paged(const uint16_t* q, const uint16_t* k, const uint16_t* v, const int32_t* tables,
                       const int32_t* lens, const int32_t* query_lens, int64_t W, int64_t first_block, const Shapes& s,
                       float scale, float* out, float* lse) {
  // a task: one decoding sequence, all its KV heads (few rows each); or a KV head's rows of one sequence, up to
  // kGroups x 32 of them
  struct Task {
    int64_t b, token, h, i0, n;  // h < 0: every KV head, few rows
  };
  std::vector<Task> tasks;
  for (int64_t b = 0, token = 0; b < s.R; ++b) {
    const int64_t n_q = query_lens ? query_lens[b] : 1, rows = n_q * s.G;
    if (n_q == 1 && s.G <= kFewRows)
      tasks.push_back({b, token, -1, token * s.G, s.G});
    else
      for (int64_t h = 0; h < s.KV; ++h)
        for (int64_t i = 0; i < rows; i += kGroups * kQueries)
          tasks.push_back({b, token, h, token * s.G + i, std::min(kGroups * kQueries, rows - i)});
    token += n_q;
  }
  const int64_t n_tasks = int64_t(tasks.size());
#pragma omp parallel if (n_tasks > 1)
  {
    configure_tiles();
    Scratch scratch(s.D);
    const int64_t threads = omp_get_num_threads();
#pragma omp for schedule(static, 1)
    for (int64_t t = 0; t < n_tasks; ++t) {
      const Task& task = tasks[t];
      const int64_t n_keys = lens[task.b] - first_block * kBlock;
      const int32_t* blocks = tables + task.b * W + first_block;
      if (t + threads < n_tasks) {  // this thread's next task: its first keys, requested while this one computes
        const Task& next = tasks[t + threads];
        const int64_t next_keys = lens[next.b] - first_block * kBlock;
        const int32_t* next_blocks = tables + next.b * W + first_block;
        prefetch_chunk<_MM_HINT_T1>(k, next_blocks, 0, next_keys, s, 0, s.KV * s.D);
        prefetch_chunk<_MM_HINT_T1>(v, next_blocks, 0, next_keys, s, 0, s.KV * s.D);
      }
      if (n_keys <= 0) {  // no key past first_block: an empty partial (0, -inf)
        for (int64_t i = task.i0; i < task.i0 + task.n; ++i)
          for (int64_t h = (task.h < 0 ? 0 : task.h); h < (task.h < 0 ? s.KV : task.h + 1); ++h) {
            const int64_t head = Rows{h, i, 1}.head(s, 0);
            std::fill(out + head * s.D, out + (head + 1) * s.D, 0.f);
            lse[head] = -std::numeric_limits<float>::infinity();
          }
        continue;
      }
      if (task.h < 0) {
        for (int64_t h0 = 0, step = std::min(kHeadsAtOnce, 16 / s.G); h0 < s.KV; h0 += step)
          few_rows_task(q, k, v, blocks, n_keys, s, scale, task.i0, task.n, h0, std::min(s.KV, h0 + step), out, lse,
                        scratch);
      } else {
        // the sequence's first new token sits at key n_keys - n_q of the range; row i is token i / G
        const int64_t n_q = query_lens ? query_lens[task.b] : 1;
        group_task(q, k, v, blocks, n_keys, s, scale, Rows{task.h, task.i0, task.n}, out, lse, scratch,
                   n_q > 1 ? n_keys - n_q - task.token : kNoMask);
      }
    }
    release_tiles();
  }
}

}  // namespace

void paged_attention_bf16(py::array q, py::array k_cache, py::array v_cache, i32_array block_tables,
                          i32_array context_lens, float scale, f32_out out, f32_out lse, int64_t first_block,
                          std::optional<i32_array> query_lens) {
  require_kernels();
  check_ndim(q, 3, "q");
  check_ndim(k_cache, 4, "k_cache");
  check_ndim(block_tables, 2, "block_tables");
  const int64_t B = block_tables.shape(0);
  check_dim(context_lens, 0, B, "context_lens");
  const int32_t* ql = nullptr;
  int64_t tokens = B;
  if (query_lens) {
    check_ndim(*query_lens, 1, "query_lens");
    check_dim(*query_lens, 0, B, "query_lens");
    ql = query_lens->data();
    tokens = 0;
    for (int64_t b = 0; b < B; ++b) {
      if (ql[b] < 1 || ql[b] > context_lens.data()[b])
        throw std::invalid_argument("query_lens[" + std::to_string(b) + "] = " + std::to_string(ql[b]) +
                                    ": expected 1 to context_lens[b]");
      tokens += ql[b];
    }
  }
  Shapes s = check_operands(q, k_cache, v_cache, out, lse);
  if (s.R != tokens)
    throw std::invalid_argument("q: expected " + std::to_string(tokens) + " rows (the query tokens), got " +
                                std::to_string(s.R));
  s.R = B;  // run_paged walks sequences
  if (first_block < 0) throw std::invalid_argument("first_block must be >= 0");
  const int64_t W = block_tables.shape(1), NB = k_cache.shape(0);
  const int32_t *tab = block_tables.data(), *lens = context_lens.data();
  check_block_tables(tab, lens, B, W, NB, kBlock, first_block);
  const uint16_t *qp = bf16_buffer(q, {-1, -1, -1}, "q"), *kp = bf16_buffer(k_cache, {-1, -1, -1, -1}, "k_cache"), *vp = bf16_buffer(v_cache, {-1, -1, -1, -1}, "v_cache");
  float *op = out.mutable_data(), *lp = lse.mutable_data();
  py::gil_scoped_release nogil;
  if (B > 0) run_paged(qp, kp, vp, tab, lens, ql, W, first_block, s, scale, op, lp);
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
  if (R > 0) run_paged(q, k_cache, v_cache, tables, lens, nullptr, W, first_block, s, scale, out, lse);
}
