// Attention over dense [B, T, heads, D] rows on AMX tiles (CPU, bf16): the decoder's self-attention in training and
// evaluation, forward and backward (the engine's paged kernels are in tile_attention.cpp). Both directions work on
// 32-key x 32-query tiles, skip the tiles a mask or causality hides entirely, and accumulate in fp32.
//
// Forward, per (batch, KV head, share of the query blocks): for each query head of the group and query block, an
// online softmax over the visible key blocks: S^T = K Q^T on tiles (in this orientation a vector holds one key for 16
// queries, so the running max and sum are lane-wise), O^T += V^T P^T with P^T's key pairs interleaved into the VNNI
// B operand, O^T rescaled when a row's max moves; out = O / sum and lse = max + log(sum) per row.
//
// Backward (FlashAttention-2's recomputation: the probabilities come back from the lse, one tile at a time, never
// stored), per (batch, KV head, share of its key blocks). For each key block, against each query head of the group
// and each 32-row query block that sees the block:
//   S^T = K Q^T, dP^T = V dO^T             A: the task's K / V rows; B: Q / dO packed by head dim (VNNI)
//   P^T = exp(scale S^T + mask^T - lse)    fp32, lane-wise
//   dS^T = scale P^T (dP^T - delta)        delta = rowsum(dO * O) per query (FlashAttention-2's D)
//   dV += P^T dO, dK += dS^T Q             A: P^T / dS^T rounded to bf16 rows; B: dO / Q packed by row pairs
//   dQ^T += K^T dS^T                       A: K^T; B: dS^T with its key pairs interleaved
// P and dS are rounded to bf16 only as operands, as GPU FlashAttention does. dV and dK take all of a key block's
// query blocks in one tile product, and dQ^T all of a query block's key blocks, so no accumulator is reloaded per
// tile; key shares' dQ^T parts are summed at the end and transposed into dQ once.
#include "dense_attention.h"

#include <cmath>
#include <limits>
#include <vector>

#include "bf16_tiles.h"

using namespace bf16_tiles;

namespace {

constexpr int64_t kBlock = 32;  // keys and queries per tile block
constexpr float kInf = std::numeric_limits<float>::infinity();

struct Dims {
  int64_t B, T, S, H, KV, G, D, Tp, Sp, mask_batches, shares;
  float scale;
  bool causal;
  int64_t offset;  // causal: query t sees keys <= t + offset (S - T: the queries are the last T of the S tokens)
};

// Rows [0, N) of h (`stride` elements apart; rows past N as zeros) as the B operand of a product over rows:
// out[p][c] = (h[2p][c], h[2p + 1][c]), [Np / 2][D] pairs.
CAI_AMX void pack_row_pairs(const uint16_t* h, int64_t stride, int64_t N, int64_t Np, int64_t D, uint32_t* out) {
  for (int64_t p = 0; p < Np / 2; ++p)
    for (int64_t c = 0; c < D; c += 16) {
      const __m512i even = 2 * p < N ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(h + 2 * p * stride + c)))
                                     : _mm512_setzero_si512();
      const __m512i odd = 2 * p + 1 < N
                              ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(h + (2 * p + 1) * stride + c)))
                              : _mm512_setzero_si512();
      _mm512_storeu_si512(out + p * D + c, _mm512_or_si512(even, _mm512_slli_epi32(odd, 16)));
    }
}

// Tile flags: which 32 x 32 (keys x queries) tiles any query sees, and whether their probabilities need the mask added
// (or the causal diagonal applied) or not.
enum Tile : uint8_t { kHidden = 0, kOpen = 1, kPartial = 2 };

// One thread's buffers: the group's queries and output gradients in both packings, their lse and delta, the KV
// head's keys and values (padded to Sp rows) and K^T; one tile's scores and dP^T; one key block's P^T and dS^T rows
// over all queries; dS^T's key pairs over all the task's key blocks (B operand of dQ^T), and its dK and dV.
struct Scratch {
  int64_t blocks;  // the most key blocks a task takes
  Buffer<uint32_t> q_by_d, do_by_d, q_pairs, do_pairs, ds_pairs;
  Buffer<float> lse, delta, scores, dp, dk, dv;
  Buffer<uint16_t> k, v, k_t, p_rows, ds_rows;
  Buffer<uint8_t> tiles;
  Buffer<int64_t> ranges;
  Scratch(const Dims& s)
      : blocks((s.Sp / kBlock + s.shares - 1) / s.shares), q_by_d(zeroed<uint32_t>(s.G * s.Tp * s.D / 2)),
        do_by_d(zeroed<uint32_t>(s.G * s.Tp * s.D / 2)), q_pairs(zeroed<uint32_t>(s.G * s.Tp * s.D / 2)),
        do_pairs(zeroed<uint32_t>(s.G * s.Tp * s.D / 2)), ds_pairs(zeroed<uint32_t>(blocks * 16 * s.Tp)),
        lse(zeroed<float>(s.G * s.Tp)), delta(zeroed<float>(s.G * s.Tp)), scores(zeroed<float>(kBlock * kBlock)),
        dp(zeroed<float>(kBlock * kBlock)), dk(zeroed<float>(blocks * kBlock * s.D)),
        dv(zeroed<float>(blocks * kBlock * s.D)), k(zeroed<uint16_t>(s.Sp * s.D)), v(zeroed<uint16_t>(s.Sp * s.D)),
        k_t(zeroed<uint16_t>(s.D * s.Sp)), p_rows(zeroed<uint16_t>(kBlock * s.Tp)),
        ds_rows(zeroed<uint16_t>(kBlock * s.Tp)), tiles(zeroed<uint8_t>(blocks * (s.Tp / kBlock))),
        ranges(zeroed<int64_t>(2 * (blocks + s.Tp / kBlock))) {}
};

// The additive mask [MB, T, S] transposed to fp32 [MB, Sp, Tp] (-inf past T and S): the kernel reads one key's 16
// queries as a vector. And each 32 x 32 tile's flag [MB][Sp / 32][Tp / 32]: hidden (all -inf), open (all 0), partial.
template <bool Bf16>
CAI_AMX void transpose_mask(const void* mask, const Dims& s, float* mask_t, uint8_t* tiles) {
  const int64_t row_blocks = s.Tp / kBlock, key_blocks = s.Sp / kBlock;
  const __m512 minus_inf = _mm512_set1_ps(-kInf), zero = _mm512_setzero_ps();
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < s.mask_batches * row_blocks; ++task) {  // a task owns its row block's tile flags
    const int64_t mb = task / row_blocks, i0 = (task % row_blocks) * kBlock;
    for (int64_t jb = 0; jb < key_blocks; ++jb) {
      bool finite = false, nonzero = false;
      for (int64_t r0 = i0; r0 < i0 + kBlock; r0 += 16)
        for (int64_t c0 = jb * kBlock; c0 < (jb + 1) * kBlock; c0 += 16) {
          __m512i r[16];
          for (int64_t i = 0; i < 16; ++i) {
            const int64_t t = r0 + i;
            __m512 row = minus_inf;
            if (t < s.T && c0 < s.S) {
              const int64_t n = std::min<int64_t>(16, s.S - c0);
              const __mmask16 m = n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1);
              const int64_t at = (mb * s.T + t) * s.S + c0;
              if (Bf16) {
                const __m256i bits = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(mask) + at);
                row = _mm512_mask_mov_ps(row, m, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16)));
              } else {
                row = _mm512_mask_loadu_ps(row, m, static_cast<const float*>(mask) + at);
              }
            }
            r[i] = _mm512_castps_si512(row);
          }
          transpose16(r);
          for (int64_t j = 0; j < 16; ++j) {
            const __m512 x = _mm512_castsi512_ps(r[j]);
            finite |= _mm512_cmp_ps_mask(x, minus_inf, _CMP_NEQ_OQ) != 0;
            nonzero |= _mm512_cmp_ps_mask(x, zero, _CMP_NEQ_UQ) != 0;
            _mm512_storeu_ps(mask_t + (mb * s.Sp + c0 + j) * s.Tp + r0, x);
          }
        }
      tiles[(mb * key_blocks + jb) * row_blocks + i0 / kBlock] = !finite ? kHidden : nonzero ? kPartial : kOpen;
    }
  }
}

struct Inputs {
  const uint16_t *q, *k, *v, *out, *grad_out;
  const float *lse, *mask_t;
  const uint8_t* tiles;
};

// ---------------------------------------------------------------- forward

inline Tile tile_kind(const Inputs& in, const Dims& s, int64_t b, int64_t j0, int64_t i0) {
  Tile kind = kOpen;
  if (s.causal) {
    if (j0 > i0 + kBlock - 1 + s.offset) return kHidden;
    if (j0 + kBlock - 1 > i0 + s.offset) kind = kPartial;  // straddles the diagonal
  }
  if (in.tiles) {
    const int64_t mb = s.mask_batches == 1 ? 0 : b;
    const uint8_t flag = in.tiles[(mb * (s.Sp / kBlock) + j0 / kBlock) * (s.Tp / kBlock) + i0 / kBlock];
    if (flag == kHidden) return kHidden;
    if (flag == kPartial) kind = kPartial;
  }
  return kind;
}

// One thread's forward buffers: the KV head's keys (padded) and V^T, one query head's rows packed by head dim, one
// tile's scores and P^T key pairs, and the running O^T [D][32] of a query block.
struct ForwardScratch {
  Buffer<uint32_t> q_by_d, p_pairs;
  Buffer<float> scores, o_t;
  Buffer<uint16_t> k, v, v_t;
  explicit ForwardScratch(const Dims& s)
      : q_by_d(zeroed<uint32_t>(s.Tp * s.D / 2)), p_pairs(zeroed<uint32_t>(16 * kBlock)),
        scores(zeroed<float>(kBlock * kBlock)), o_t(zeroed<float>(s.D * kBlock)), k(zeroed<uint16_t>(s.Sp * s.D)),
        v(zeroed<uint16_t>(s.Sp * s.D)), v_t(zeroed<uint16_t>(s.D * s.Sp)) {}
};

// rows [Sp][D] of KV head h (zeros past S) into dst, and their transpose [D][Sp] into dst_t when given
CAI_AMX void load_rows(const uint16_t* src, const Dims& s, int64_t b, int64_t h, uint16_t* dst, uint16_t* dst_t) {
  const int64_t D = s.D;
  for (int64_t t = 0; t < s.Sp; ++t) {
    if (t < s.S)
      std::memcpy(dst + t * D, src + ((b * s.S + t) * s.KV + h) * D, D * 2);
    else
      std::memset(dst + t * D, 0, D * 2);
  }
  if (!dst_t) return;
  for (int64_t t0 = 0; t0 < s.Sp; t0 += 16)  // 16 x 16 transposes of 16-bit values, widened to 32
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      __m512i r[16];
      for (int64_t i = 0; i < 16; ++i)
        r[i] = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(dst + (t0 + i) * D + d0)));
      transpose16(r);
      for (int64_t j = 0; j < 16; ++j)
        _mm256_storeu_si256((__m256i*)(dst_t + (d0 + j) * s.Sp + t0), _mm512_cvtepi32_epi16(r[j]));
    }
}

// Query blocks share, share + shares, ... of every query head of KV head h in batch b: online softmax over the
// visible key blocks (S^T = K Q^T on tiles; running max, sum and O^T = V^T P^T rescaled per block, all fp32; P^T
// rounded to bf16 as the product's operand), then out = O / sum (bf16) and lse = max + log(sum).
CAI_AMX void forward_task(const Inputs& in, const Dims& s, int64_t b, int64_t h, int64_t share, ForwardScratch& w,
                          uint16_t* out, float* lse) {
  const int64_t D = s.D, key_blocks = s.Sp / kBlock;
  load_rows(in.k, s, b, h, w.k.get(), nullptr);
  load_rows(in.v, s, b, h, w.v.get(), w.v_t.get());
  const __m512 scale = _mm512_set1_ps(s.scale), minus_inf = _mm512_set1_ps(-kInf);
  const int64_t mb = s.mask_batches == 1 ? 0 : b;
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t g = 0; g < s.G; ++g) {
    const int64_t head = h * s.G + g;
    const uint16_t* q = in.q + (b * s.T * s.H + head) * D;
    for (int64_t i0 = share * kBlock; i0 < s.Tp; i0 += s.shares * kBlock) {
      pack_block_by_k(q, s.H * D, i0, s.T, D, D, w.q_by_d.get());
      pack_block_by_k(q, s.H * D, i0 + 16, s.T, D, D, w.q_by_d.get());
      const uint32_t* q_by_d = w.q_by_d.get() + (i0 / 16) * (D / 2) * 16;
      std::fill(w.o_t.get(), w.o_t.get() + D * kBlock, 0.f);
      __m512 row_max[2] = {minus_inf, minus_inf}, row_sum[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
      __m512i rows[2];
      for (int half = 0; half < 2; ++half)
        rows[half] = _mm512_add_epi32(lane, _mm512_set1_epi32(int32_t(i0 + 16 * half + s.offset)));
      for (int64_t jb = 0; jb < key_blocks; ++jb) {
        const int64_t j0 = jb * kBlock;
        const Tile kind = tile_kind(in, s, b, j0, i0);
        if (kind == kHidden) continue;
        const bool add_mask = kind == kPartial && in.mask_t, diagonal = kind == kPartial && s.causal;
        tile_2x2(w.k.get() + j0 * D, D * 2, 64, q_by_d, D * 32, 64, 1024, D / kBlock, w.scores.get(), kBlock * 4, false);
        for (int half = 0; half < 2; ++half) {
          __m512 x[kBlock];
          __m512 tile_max = minus_inf;
          for (int64_t m = 0; m < kBlock; ++m) {
            const int64_t key = j0 + m;
            if (key >= s.S) {
              x[m] = minus_inf;
              continue;
            }
            x[m] = _mm512_mul_ps(_mm512_loadu_ps(w.scores.get() + m * kBlock + 16 * half), scale);
            if (add_mask) x[m] = _mm512_add_ps(x[m], _mm512_loadu_ps(in.mask_t + (mb * s.Sp + key) * s.Tp + i0 + 16 * half));
            if (diagonal)
              x[m] = _mm512_mask_mov_ps(minus_inf, _mm512_cmp_epi32_mask(rows[half], _mm512_set1_epi32(int32_t(key)), _MM_CMPINT_NLT), x[m]);
            tile_max = _mm512_max_ps(tile_max, x[m]);
          }
          const __m512 new_max = _mm512_max_ps(row_max[half], tile_max);
          // rows that have seen no key yet keep 0 as their reference: every exp below is then exp(-inf) = 0
          const __mmask16 seen = _mm512_cmp_ps_mask(new_max, minus_inf, _CMP_NEQ_OQ);
          const __m512 reference = _mm512_maskz_mov_ps(seen, new_max);
          const __m512 alpha = exp_nonpositive16(_mm512_sub_ps(_mm512_maskz_mov_ps(seen, row_max[half]), reference));
          row_max[half] = new_max;
          __m512 sum = _mm512_setzero_ps();
          for (int64_t pair = 0; pair < kBlock / 2; ++pair) {
            const __m512 even = exp_nonpositive16(_mm512_sub_ps(x[2 * pair], reference));
            const __m512 odd = exp_nonpositive16(_mm512_sub_ps(x[2 * pair + 1], reference));
            sum = _mm512_add_ps(sum, _mm512_add_ps(even, odd));
            const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(even));
            const __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(odd));
            _mm512_storeu_si512(w.p_pairs.get() + pair * kBlock + 16 * half, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
          }
          // a row first seen here had alpha = exp(-inf - 0) = 0 against an empty sum and output: no harm
          row_sum[half] = _mm512_fmadd_ps(row_sum[half], alpha, sum);
          if (_mm512_cmp_ps_mask(alpha, _mm512_set1_ps(1.f), _CMP_NEQ_OQ))
            for (int64_t d = 0; d < D; ++d) {
              float* o = w.o_t.get() + d * kBlock + 16 * half;
              _mm512_storeu_ps(o, _mm512_mul_ps(_mm512_loadu_ps(o), alpha));
            }
        }
        for (int64_t d0 = 0; d0 < D; d0 += kBlock)
          tile_2x2(w.v_t.get() + d0 * s.Sp + j0, s.Sp * 2, 0, w.p_pairs.get(), 64, kBlock * 4, 0, 1,
                   w.o_t.get() + d0 * kBlock, kBlock * 4, true);
      }
      for (int half = 0; half < 2; ++half) {  // normalise, transpose O^T into rows, round
        alignas(64) float inverse[16], log_sum_exp[16];
        const __mmask16 any = _mm512_cmp_ps_mask(row_sum[half], _mm512_setzero_ps(), _CMP_GT_OQ);
        _mm512_store_ps(inverse, _mm512_maskz_div_ps(any, _mm512_set1_ps(1.f), row_sum[half]));
        for (int j = 0; j < 16; ++j) log_sum_exp[j] = -kInf;
        alignas(64) float sums[16], maxes[16];
        _mm512_store_ps(sums, row_sum[half]);
        _mm512_store_ps(maxes, row_max[half]);
        for (int j = 0; j < 16; ++j)
          if (sums[j] > 0.f) log_sum_exp[j] = maxes[j] + std::log(sums[j]);
        for (int64_t d0 = 0; d0 < D; d0 += 16) {
          __m512i r[16];
          for (int64_t i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(w.o_t.get() + (d0 + i) * kBlock + 16 * half);
          transpose16(r);
          for (int64_t j = 0; j < 16; ++j) {
            const int64_t t = i0 + 16 * half + j;
            if (t >= s.T) break;
            const __m512 row = _mm512_mul_ps(_mm512_castsi512_ps(r[j]), _mm512_set1_ps(inverse[j]));
            _mm256_storeu_si256((__m256i*)(out + ((b * s.T + t) * s.H + head) * D + d0), (__m256i)_mm512_cvtneps_pbh(row));
          }
        }
        for (int64_t j = 0; j < 16 && i0 + 16 * half + j < s.T; ++j)
          lse[(b * s.T + i0 + 16 * half + j) * s.H + head] = log_sum_exp[j];
      }
    }
  }
}

// The mask's transpose and tile flags for a call (none without a mask).
struct MaskTiles {
  Buffer<float> mask_t;
  Buffer<uint8_t> tiles;
};

CAI_AMX MaskTiles prepare_mask(const Dims& s, const void* mask, bool mask_bf16, Inputs& in) {
  MaskTiles m;
  if (!mask) return m;
  m.mask_t = uninitialized<float>(s.mask_batches * s.Sp * s.Tp);
  m.tiles = uninitialized<uint8_t>(s.mask_batches * (s.Sp / kBlock) * (s.Tp / kBlock));
  if (mask_bf16)
    transpose_mask<true>(mask, s, m.mask_t.get(), m.tiles.get());
  else
    transpose_mask<false>(mask, s, m.mask_t.get(), m.tiles.get());
  in.mask_t = m.mask_t.get();
  in.tiles = m.tiles.get();
  return m;
}

CAI_AMX void run_forward(const Inputs& given, const Dims& s, const void* mask, bool mask_bf16, uint16_t* out,
                         float* lse) {
  Inputs in = given;
  const MaskTiles held = prepare_mask(s, mask, mask_bf16, in);
  const int64_t tasks = s.B * s.KV * s.shares;
#pragma omp parallel
  {
    configure_tiles();
    ForwardScratch w(s);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task)
      forward_task(in, s, task / (s.KV * s.shares), task / s.shares % s.KV, task % s.shares, w, out, lse);
    release_tiles();
  }
}

// The task's rows in their packings: keys and values of KV head h (padded, and K^T), and for each query head of the
// group its queries and output gradients (by head dim and by row pairs), lse (+inf past T and for rows that saw no
// key: their probabilities are 0) and delta.
CAI_AMX void load_task(const Inputs& in, const Dims& s, int64_t b, int64_t h, Scratch& w) {
  const int64_t D = s.D, q_stride = s.H * D;
  load_rows(in.k, s, b, h, w.k.get(), w.k_t.get());
  load_rows(in.v, s, b, h, w.v.get(), nullptr);
  for (int64_t g = 0; g < s.G; ++g) {
    const int64_t head = h * s.G + g, packed = g * s.Tp * D / 2;
    const uint16_t *q = in.q + (b * s.T * s.H + head) * D, *dout = in.grad_out + (b * s.T * s.H + head) * D;
    for (int64_t t0 = 0; t0 < s.Tp; t0 += 16) {
      pack_block_by_k(q, q_stride, t0, s.T, D, D, w.q_by_d.get() + packed);
      pack_block_by_k(dout, q_stride, t0, s.T, D, D, w.do_by_d.get() + packed);
    }
    pack_row_pairs(q, q_stride, s.T, s.Tp, D, w.q_pairs.get() + packed);
    pack_row_pairs(dout, q_stride, s.T, s.Tp, D, w.do_pairs.get() + packed);
    float *lse = w.lse.get() + g * s.Tp, *delta = w.delta.get() + g * s.Tp;
    for (int64_t t = 0; t < s.Tp; ++t) {
      if (t >= s.T) {
        lse[t] = kInf;
        delta[t] = 0.f;
        continue;
      }
      const float l = in.lse[(b * s.T + t) * s.H + head];
      lse[t] = l == -kInf ? kInf : l;
      const int64_t at = ((b * s.T + t) * s.H + head) * D;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 16)
        acc = _mm512_fmadd_ps(widen_bf16(in.grad_out + at + d), widen_bf16(in.out + at + d), acc);
      delta[t] = _mm512_reduce_add_ps(acc);
    }
  }
}

// P^T and dS^T of one tile from its scores and dP^T (both [32 keys][32 queries] fp32): bf16 rows into p_rows and
// ds_rows (stride Tp: the A operands of dV and dK) and dS^T's key pairs into ds_pairs (stride Tp: B of dQ^T).
CAI_AMX void tile_probabilities(const Inputs& in, const Dims& s, int64_t b, int64_t g, int64_t j0, int64_t i0,
                                Tile kind, Scratch& w, uint16_t* p_rows, uint16_t* ds_rows, uint32_t* ds_pairs) {
  const __m512 scale = _mm512_set1_ps(s.scale);
  const int64_t mb = s.mask_batches == 1 ? 0 : b;
  const bool add_mask = kind == kPartial && in.mask_t, diagonal = kind == kPartial && s.causal;
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  __m512 lse[2], delta[2];
  __m512i rows[2];
  for (int half = 0; half < 2; ++half) {
    lse[half] = _mm512_loadu_ps(w.lse.get() + g * s.Tp + i0 + 16 * half);
    delta[half] = _mm512_loadu_ps(w.delta.get() + g * s.Tp + i0 + 16 * half);
    rows[half] = _mm512_add_epi32(lane, _mm512_set1_epi32(int32_t(i0 + 16 * half + s.offset)));
  }
  for (int64_t pair = 0; pair < kBlock / 2; ++pair) {
    __m512 ds[2][2];
    for (int e = 0; e < 2; ++e) {
      const int64_t m = 2 * pair + e, key = j0 + m;
      __m512 p[2];
      for (int half = 0; half < 2; ++half) {
        if (key >= s.S) {
          p[half] = ds[e][half] = _mm512_setzero_ps();
          continue;
        }
        __m512 x = _mm512_fmsub_ps(_mm512_loadu_ps(w.scores.get() + m * kBlock + 16 * half), scale, lse[half]);
        if (add_mask) x = _mm512_add_ps(x, _mm512_loadu_ps(in.mask_t + (mb * s.Sp + key) * s.Tp + i0 + 16 * half));
        p[half] = exp_nonpositive16(x);  // -inf (masked, or a row past T) gives 0
        if (diagonal)
          p[half] = _mm512_maskz_mov_ps(_mm512_cmp_epi32_mask(rows[half], _mm512_set1_epi32(int32_t(key)), _MM_CMPINT_NLT),
                                        p[half]);
        const __m512 dp = _mm512_loadu_ps(w.dp.get() + m * kBlock + 16 * half);
        ds[e][half] = _mm512_mul_ps(_mm512_mul_ps(p[half], _mm512_sub_ps(dp, delta[half])), scale);
      }
      _mm512_storeu_si512(p_rows + m * s.Tp, (__m512i)_mm512_cvtne2ps_pbh(p[1], p[0]));
      _mm512_storeu_si512(ds_rows + m * s.Tp, (__m512i)_mm512_cvtne2ps_pbh(ds[e][1], ds[e][0]));
    }
    for (int half = 0; half < 2; ++half) {
      const __m512i even = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(ds[0][half]));
      const __m512i odd = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(ds[1][half]));
      _mm512_storeu_si512(ds_pairs + pair * s.Tp + 16 * half, _mm512_or_si512(even, _mm512_slli_epi32(odd, 16)));
    }
  }
}

inline void zero_tile(uint16_t* p_rows, uint16_t* ds_rows, int64_t stride) {
  for (int64_t m = 0; m < kBlock; ++m) {
    std::memset(p_rows + m * stride, 0, kBlock * 2);
    std::memset(ds_rows + m * stride, 0, kBlock * 2);
  }
}

inline void zero_pairs(uint32_t* ds_pairs, int64_t stride) {
  for (int64_t pair = 0; pair < kBlock / 2; ++pair) std::memset(ds_pairs + pair * stride, 0, kBlock * 4);
}

// Key blocks share, share + shares, ... (the task's local blocks) of KV head h in batch b: their dK and dV rows
// written as bf16, and this task's part of dQ^T [G][D][Tp] into dq_t. For each query head, each key block's visible
// row blocks give P^T and dS^T rows, then dV and dK take all of them in one tile product each (accumulators loaded
// once per key block, not per tile); dQ^T takes each row block's visible key blocks in one product at the end.
CAI_AMX void run_task(const Inputs& in, const Dims& s, int64_t b, int64_t h, int64_t share, Scratch& w, float* dq_t,
                      uint16_t* grad_k, uint16_t* grad_v) {
  const int64_t D = s.D, packed = s.Tp * D / 2, row_blocks = s.Tp / kBlock;
  const int64_t blocks = (s.Sp / kBlock - share + s.shares - 1) / s.shares;
  auto key_start = [&](int64_t local) { return (share + local * s.shares) * kBlock; };
  load_task(in, s, b, h, w);
  uint8_t* tiles = w.tiles.get();
  int64_t *row_lo = w.ranges.get(), *row_hi = row_lo + blocks, *key_lo = row_hi + blocks, *key_hi = key_lo + row_blocks;
  std::fill(key_lo, key_lo + row_blocks, blocks);
  std::fill(key_hi, key_hi + row_blocks, int64_t(0));
  for (int64_t local = 0; local < blocks; ++local) {
    row_lo[local] = row_blocks;
    row_hi[local] = 0;
    for (int64_t ib = 0; ib < row_blocks; ++ib) {
      const Tile kind = tile_kind(in, s, b, key_start(local), ib * kBlock);
      tiles[local * row_blocks + ib] = kind;
      if (kind == kHidden) continue;
      row_lo[local] = std::min(row_lo[local], ib);
      row_hi[local] = ib + 1;
      key_lo[ib] = std::min(key_lo[ib], local);
      key_hi[ib] = local + 1;
    }
  }
  for (int64_t g = 0; g < s.G; ++g) {
    for (int64_t local = 0; local < blocks; ++local) {
      const int64_t j0 = key_start(local);
      uint32_t* ds_pairs = w.ds_pairs.get() + local * 16 * s.Tp;
      for (int64_t ib = 0; ib < row_blocks; ++ib) {
        const int64_t i0 = ib * kBlock;
        const Tile kind = Tile(tiles[local * row_blocks + ib]);
        if (kind == kHidden) {  // zeros where a product below reads this tile
          if (ib >= row_lo[local] && ib < row_hi[local]) zero_tile(w.p_rows.get() + i0, w.ds_rows.get() + i0, s.Tp);
          if (local >= key_lo[ib] && local < key_hi[ib]) zero_pairs(ds_pairs + i0, s.Tp);
          continue;
        }
        const uint32_t* q_by_d = w.q_by_d.get() + g * packed + (i0 / 16) * (D / 2) * 16;
        const uint32_t* do_by_d = w.do_by_d.get() + g * packed + (i0 / 16) * (D / 2) * 16;
        tile_2x2(w.k.get() + j0 * D, D * 2, 64, q_by_d, D * 32, 64, 1024, D / kBlock, w.scores.get(), kBlock * 4, false);
        tile_2x2(w.v.get() + j0 * D, D * 2, 64, do_by_d, D * 32, 64, 1024, D / kBlock, w.dp.get(), kBlock * 4, false);
        tile_probabilities(in, s, b, g, j0, i0, kind, w, w.p_rows.get() + i0, w.ds_rows.get() + i0, ds_pairs + i0);
      }
      const int64_t lo = row_lo[local], steps = row_hi[local] - lo;
      const bool accumulate = g > 0;
      float *dk = w.dk.get() + local * kBlock * D, *dv = w.dv.get() + local * kBlock * D;
      if (steps <= 0) {  // no query sees these keys
        if (!accumulate) {
          std::fill(dk, dk + kBlock * D, 0.f);
          std::fill(dv, dv + kBlock * D, 0.f);
        }
        continue;
      }
      const uint32_t* do_pairs = w.do_pairs.get() + g * packed + lo * (kBlock / 2) * D;
      const uint32_t* q_pairs = w.q_pairs.get() + g * packed + lo * (kBlock / 2) * D;
      for (int64_t d0 = 0; d0 < D; d0 += kBlock) {
        tile_2x2(w.p_rows.get() + lo * kBlock, s.Tp * 2, 64, do_pairs + d0, 64, D * 4, 16 * D * 4, steps, dv + d0,
                 D * 4, accumulate);
        tile_2x2(w.ds_rows.get() + lo * kBlock, s.Tp * 2, 64, q_pairs + d0, 64, D * 4, 16 * D * 4, steps, dk + d0,
                 D * 4, accumulate);
      }
    }
    float* dq = dq_t + g * D * s.Tp;
    for (int64_t ib = 0; ib < row_blocks; ++ib) {
      const int64_t i0 = ib * kBlock, lo = key_lo[ib], steps = key_hi[ib] - lo;
      for (int64_t d0 = 0; d0 < D; d0 += kBlock) {
        if (steps <= 0) {
          for (int64_t d = d0; d < d0 + kBlock; ++d) std::fill(dq + d * s.Tp + i0, dq + d * s.Tp + i0 + kBlock, 0.f);
          continue;
        }
        tile_2x2(w.k_t.get() + d0 * s.Sp + key_start(lo), s.Sp * 2, s.shares * 64,
                 w.ds_pairs.get() + lo * 16 * s.Tp + i0, 64, s.Tp * 4, 16 * s.Tp * 4, steps, dq + d0 * s.Tp + i0,
                 s.Tp * 4, false);
      }
    }
  }
  for (int64_t local = 0; local < blocks; ++local) {
    const int64_t j0 = key_start(local);
    const float *dk = w.dk.get() + local * kBlock * D, *dv = w.dv.get() + local * kBlock * D;
    for (int64_t m = 0; m < kBlock && j0 + m < s.S; ++m) {
      const int64_t at = ((b * s.S + j0 + m) * s.KV + h) * D;
      for (int64_t d = 0; d < D; d += 32) {
        _mm512_storeu_si512(grad_k + at + d, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(dk + m * D + d + 16),
                                                                          _mm512_loadu_ps(dk + m * D + d)));
        _mm512_storeu_si512(grad_v + at + d, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(dv + m * D + d + 16),
                                                                          _mm512_loadu_ps(dv + m * D + d)));
      }
    }
  }
}

// dQ of query head `head` in batch b: the key shares' dQ^T [D][Tp] summed, transposed by 16 x 16 blocks, rounded.
CAI_AMX void write_dq(const float* dq_t, const Dims& s, int64_t b, int64_t head, uint16_t* grad_q) {
  const int64_t D = s.D, h = head / s.G, g = head % s.G, part = s.G * D * s.Tp;
  const float* first = dq_t + ((b * s.KV + h) * s.shares * s.G + g) * D * s.Tp;
  for (int64_t t0 = 0; t0 < s.T; t0 += 16)
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      __m512i r[16];
      for (int64_t i = 0; i < 16; ++i) {
        __m512 x = _mm512_loadu_ps(first + (d0 + i) * s.Tp + t0);
        for (int64_t share = 1; share < s.shares; ++share)
          x = _mm512_add_ps(x, _mm512_loadu_ps(first + share * part + (d0 + i) * s.Tp + t0));
        r[i] = _mm512_castps_si512(x);
      }
      transpose16(r);
      for (int64_t j = 0; j < 16 && t0 + j < s.T; ++j)
        _mm256_storeu_si256((__m256i*)(grad_q + ((b * s.T + t0 + j) * s.H + head) * D + d0),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_castsi512_ps(r[j])));
    }
}

CAI_AMX void run(const Inputs& given, const Dims& s, const void* mask, bool mask_bf16, uint16_t* grad_q,
                 uint16_t* grad_k, uint16_t* grad_v) {
  Inputs in = given;
  const MaskTiles held = prepare_mask(s, mask, mask_bf16, in);
  auto dq_t = uninitialized<float>(s.B * s.KV * s.shares * s.G * s.D * s.Tp);  // every task writes all of its part
  const int64_t tasks = s.B * s.KV * s.shares;
#pragma omp parallel
  {
    configure_tiles();
    Scratch w(s);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = task / (s.KV * s.shares), h = task / s.shares % s.KV, share = task % s.shares;
      run_task(in, s, b, h, share, w, dq_t.get() + task * s.G * s.D * s.Tp, grad_k, grad_v);
    }
    release_tiles();
  }
#pragma omp parallel for schedule(static)
  for (int64_t bh = 0; bh < s.B * s.H; ++bh) write_dq(dq_t.get(), s, bh / s.H, bh % s.H, grad_q);
}

uint16_t* bf16_out(py::array& a, const std::vector<int64_t>& shape, const char* name) {
  bf16_buffer(a, shape, name);
  return static_cast<uint16_t*>(writable(a, name));
}

}  // namespace

namespace {

// The shapes every entry point checks: q [B, T, H, D], k and v [B, S, KV, D], mask [1 or B, T, S] (float32 or bf16)
Dims check_operands(const py::array& q, const py::array& k, const py::array& v, const std::optional<py::array>& mask,
                    bool causal, float scale, const void** mask_data, bool* mask_bf16) {
  require_kernels();
  check_ndim(q, 4, "q");
  check_ndim(k, 4, "k");
  Dims s{};
  s.B = q.shape(0), s.T = q.shape(1), s.H = q.shape(2), s.D = q.shape(3), s.S = k.shape(1), s.KV = k.shape(2);
  if (k.shape(0) != s.B || k.shape(3) != s.D)
    throw std::invalid_argument("k: expected [" + std::to_string(s.B) + ", S, KV, " + std::to_string(s.D) + "]");
  if (s.KV < 1 || s.H % s.KV)
    throw std::invalid_argument("q has " + std::to_string(s.H) + " heads, k " + std::to_string(s.KV) +
                                ": expected a multiple");
  if (s.D % 32 || s.D > 256)
    throw std::invalid_argument("head_dim " + std::to_string(s.D) + ": expected a multiple of 32, at most 256");
  if (causal && s.S < s.T) throw std::invalid_argument("causal attention needs at least as many keys as queries");
  bf16_buffer(q, {s.B, s.T, s.H, s.D}, "q");
  bf16_buffer(k, {s.B, s.S, s.KV, s.D}, "k");
  bf16_buffer(v, {s.B, s.S, s.KV, s.D}, "v");
  *mask_data = nullptr;
  *mask_bf16 = false;
  s.mask_batches = 1;
  if (mask) {
    check_ndim(*mask, 3, "mask");
    s.mask_batches = mask->shape(0);
    if (s.mask_batches != 1 && s.mask_batches != s.B)
      throw std::invalid_argument("mask: expected 1 or " + std::to_string(s.B) + " on axis 0, got " +
                                  std::to_string(s.mask_batches));
    check_dim(*mask, 1, s.T, "mask");
    check_dim(*mask, 2, s.S, "mask");
    const FloatOrBf16 m = float_or_bf16(*mask, mask->size(), "mask");
    *mask_data = m.data;
    *mask_bf16 = m.bf16;
  }
  s.G = s.H / s.KV;
  s.Tp = round_up(std::max<int64_t>(s.T, 1), kBlock);
  s.Sp = round_up(std::max<int64_t>(s.S, 1), kBlock);
  s.scale = scale;
  s.causal = causal;
  s.offset = s.S - s.T;
  return s;
}

// enough tasks for every thread: split each (batch, KV head)'s blocks between tasks when there are few pairs
int64_t shares_for(const Dims& s, int64_t blocks) {
  const int64_t pairs = std::max<int64_t>(1, s.B * s.KV), threads = max_threads();
  return std::max<int64_t>(1, std::min<int64_t>(blocks, (2 * threads + pairs - 1) / pairs));
}

void check_lse(const py::array& lse, const Dims& s) {
  check_ndim(lse, 3, "lse");
  check_dim(lse, 0, s.B, "lse");
  check_dim(lse, 1, s.T, "lse");
  check_dim(lse, 2, s.H, "lse");
}

}  // namespace

void attention_forward_bf16(py::array q, py::array k, py::array v, std::optional<py::array> mask, bool causal,
                            float scale, py::array out, f32_out lse) {
  const void* mask_data;
  bool mask_bf16;
  Dims s = check_operands(q, k, v, mask, causal, scale, &mask_data, &mask_bf16);
  check_lse(lse, s);
  uint16_t* op = bf16_out(out, {s.B, s.T, s.H, s.D}, "out");
  float* lp = lse.mutable_data();
  s.shares = shares_for(s, s.Tp / kBlock);  // of the query blocks
  const Inputs in{static_cast<const uint16_t*>(q.data()), static_cast<const uint16_t*>(k.data()),
                  static_cast<const uint16_t*>(v.data()), nullptr, nullptr, nullptr, nullptr, nullptr};
  py::gil_scoped_release nogil;
  if (s.B > 0 && s.T > 0 && s.S > 0) {
    run_forward(in, s, mask_data, mask_bf16, op, lp);
  } else {
    std::fill(op, op + s.B * s.T * s.H * s.D, uint16_t(0));
    std::fill(lp, lp + s.B * s.T * s.H, -kInf);
  }
}

void attention_backward_bf16(py::array q, py::array k, py::array v, py::array out, py::array grad_out, f32_array lse,
                             std::optional<py::array> mask, bool causal, float scale, py::array grad_q,
                             py::array grad_k, py::array grad_v) {
  const void* mask_data;
  bool mask_bf16;
  Dims s = check_operands(q, k, v, mask, causal, scale, &mask_data, &mask_bf16);
  const std::vector<int64_t> q_shape{s.B, s.T, s.H, s.D}, kv_shape{s.B, s.S, s.KV, s.D};
  const uint16_t *op = bf16_buffer(out, q_shape, "out"), *dop = bf16_buffer(grad_out, q_shape, "grad_out");
  check_lse(lse, s);
  uint16_t *dq = bf16_out(grad_q, q_shape, "grad_q"), *dk = bf16_out(grad_k, kv_shape, "grad_k"),
           *dv = bf16_out(grad_v, kv_shape, "grad_v");
  s.shares = shares_for(s, s.Sp / kBlock);  // of the key blocks
  const Inputs in{static_cast<const uint16_t*>(q.data()), static_cast<const uint16_t*>(k.data()),
                  static_cast<const uint16_t*>(v.data()), op, dop, lse.data(), nullptr, nullptr};
  py::gil_scoped_release nogil;
  if (s.B > 0 && s.T > 0 && s.S > 0) {
    run(in, s, mask_data, mask_bf16, dq, dk, dv);
  } else {
    std::fill(dq, dq + s.B * s.T * s.H * s.D, uint16_t(0));
    std::fill(dk, dk + s.B * s.S * s.KV * s.D, uint16_t(0));
    std::fill(dv, dv + s.B * s.S * s.KV * s.D, uint16_t(0));
  }
}
