// Fused log-prob / entropy / KL from bf16 hidden states and LM heads, on AMX-BF16 tiles (or, on CPUs with
// AVX512-BF16 but no AMX, the same tiles computed with VDPBF16PS vectors: `vector_tiles`).
//
// Logits are computed transposed, zT[v, n] = W[v] . h[n], in 32 x 32 blocks of four 16 x 16 fp32 AMX
// accumulators (TDPBF16PS: bf16 products are exact in fp32, so the only error is fp32 accumulation order).
// In that orientation a 16-float vector holds one vocabulary row for 16 tokens, so the online
// max / sum-exp / entropy / KL statistics are plain lane-wise updates with no horizontal reductions.
// The forward sweeps the vocabulary per token block and keeps only per-token statistics; the backward
// sweeps tokens per vocabulary block, recomputes each logit tile, turns it into dL/dz in bf16 while it
// is in cache, and feeds it to two more tile GEMMs: dW for the block (accumulated in fp32, written once,
// in bf16) and dh^T (fp32, one partial per thread, summed at the end). Logits never reach memory.
// The tile machinery (dispatch, tile_2x2, Head, token packing) lives in bf16_tiles.h.
#include "logprob_bf16.h"

#include <cmath>
#include <vector>

#include "bf16_tiles.h"
#include "logprob.h"
#include "vecmath.h"

using namespace bf16_tiles;

namespace {

constexpr int64_t kFwdTokens = 256;    // tokens per forward block (their packed hidden stays in L2)
constexpr int64_t kFwdRows = 32;       // vocabulary rows per forward epilogue chunk
constexpr int64_t kBwdRows = 256;      // vocabulary rows per backward block (its fp32 dW stays in L2)
constexpr int64_t kBwdTokens = 128;    // tokens per backward tile

// ---------------------------------------------------------------- operands

const uint16_t* bf16_ptr(const bf16_array& a, int ndim, const char* name) {
  check_ndim(a, ndim, name);
  if (!(a.flags() & py::array::c_style)) throw std::invalid_argument(std::string(name) + ": must be contiguous");
  return reinterpret_cast<const uint16_t*>(a.data());
}

uint16_t* bf16_out(py::object o, int64_t rows, int64_t cols, const char* name) {
  if (o.is_none()) return nullptr;
  auto a = o.cast<bf16_array>();
  check_ndim(a, 2, name);
  check_dim(a, 0, rows, name);
  check_dim(a, 1, cols, name);
  if (!(a.flags() & py::array::c_style)) throw std::invalid_argument(std::string(name) + ": must be contiguous");
  return reinterpret_cast<uint16_t*>(a.mutable_data());
}

float* f32_out_ptr(py::object o, int64_t rows, const char* name) {
  if (o.is_none()) return nullptr;
  auto a = o.cast<f32_out>();
  check_ndim(a, 1, name);
  check_dim(a, 0, rows, name);
  if (!(a.flags() & py::array::c_style)) throw std::invalid_argument(std::string(name) + ": must be contiguous");
  return a.mutable_data();
}

const float* f32_in(const f32_array& a, int64_t rows, const char* name) {
  check_ndim(a, 1, name);
  check_dim(a, 0, rows, name);
  return a.data();
}

Buffer<uint16_t> pack_tokens_by_pairs(const uint16_t* h, int64_t N, int64_t d, int64_t Np, int64_t Kp) {
  auto out = zeroed<uint16_t>(Np * Kp);
  uint16_t* o = out.get();
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < d; ++k) o[(n / 2) * Kp * 2 + k * 2 + n % 2] = h[n * d + k];
  return out;
}

// Exact logit of each token's label (fp32 products of bf16 inputs summed in double).
void label_logits(const uint16_t* h, const Head& head, const int64_t* y, int64_t N, int64_t ignore_index,
                  float* out) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    if (y[n] == ignore_index) {
      out[n] = 0.f;
      continue;
    }
    const uint16_t *hn = h + n * head.d, *wn = head.w + y[n] * head.d;
    double s = head.bias_at(y[n]);
    for (int64_t k = 0; k < head.d; ++k) s += double(bf16_to_float(hn[k])) * bf16_to_float(wn[k]);
    out[n] = float(s);
  }
}

struct Operands {  // checked hidden + head
  const uint16_t* h;
  int64_t N, d, V;
};

Operands check_head(const bf16_array& hidden, const bf16_array& weight, const char* hname, const char* wname) {
  const uint16_t* h = bf16_ptr(hidden, 2, hname);
  bf16_ptr(weight, 2, wname);
  if (weight.shape(1) != hidden.shape(1))
    throw std::invalid_argument(std::string(wname) + ": expected [V, " + std::to_string(hidden.shape(1)) +
                                "], got [" + std::to_string(weight.shape(0)) + ", " +
                                std::to_string(weight.shape(1)) + "]");
  return {h, hidden.shape(0), hidden.shape(1), weight.shape(0)};
}

const float* bias_ptr(py::object bias, int64_t V, const char* name, f32_array& keep) {
  if (bias.is_none()) return nullptr;
  keep = bias.cast<f32_array>();
  return f32_in(keep, V, name);
}

// ---------------------------------------------------------------- forward sweeps

// Online per-token statistics over the vocabulary, 16 tokens per vector.
struct LogprobStats {
  __m512 m, s, u;  // running max of zs, sum exp(zs - m), sum exp(zs - m) (zs - m)
};

// Sweeps the vocabulary for tokens [n0, n0 + nn) of one head (or two, for the KL), calling
// `chunk(zbuf, rbuf, v0, nv)` on each [kFwdRows, kFwdTokens] tile of scaled-less logits.
template <class Chunk>
CAI_AMX void sweep_vocab(const Head& head, const uint32_t* hk, const Head* ref, const uint32_t* rk, int64_t n0,
                         int64_t nn, float* zbuf, float* rbuf, Chunk&& chunk) {
  const int64_t nnp = round_up(nn, kTile);
  for (int64_t v0 = 0; v0 < head.V; v0 += kFwdRows) {
    const int64_t nv = std::min(kFwdRows, head.V - v0);
    weight_tiles(head, hk, v0, kFwdRows, n0, nnp, zbuf, kFwdTokens);
    if (ref) weight_tiles(*ref, rk, v0, kFwdRows, n0, nnp, rbuf, kFwdTokens);
    chunk(v0, nv, nnp);
  }
}

}  // namespace

bool bf16_kernels_available() { return cpu().avx512_bf16; }

bool amx_available() { return cpu().amx; }

// Where the bf16 kernels beat converting to fp32 for BLAS: with AMX tiles, and on AMD CPUs (Zen 4 issues a
// 512-bit VDPBF16PS, 64 flops, at the rate of a 32-flop fp32 FMA). Intel cores without AMX issue VDPBF16PS at a
// quarter of their FMA rate (measured on Sapphire Rapids: 1.8 vs 7.0 G instructions/s), half the flops of fp32.
bool bf16_kernels_preferred() { return cpu().amx || (cpu().avx512_bf16 && cpu().amd); }

namespace {

CAI_AMX void logprob_forward_impl(const uint16_t* h, const uint16_t* w, const float* b, const int64_t* y, int64_t N,
                                 int64_t V, int64_t d, float inv_temp, int64_t ignore_index, float* lp, float* ls,
                                 float* ent) {
  Head head(w, b, V, d);
  const int64_t Np = round_up(N, kTile);
  auto hk = pack_tokens_by_k(h, N, d, Np, head.Kp);
  auto zy = zeroed<float>(N);
  label_logits(h, head, y, N, ignore_index, zy.get());
  const int64_t blocks = (N + kFwdTokens - 1) / kFwdTokens;
#pragma omp parallel
  {
    configure_tiles();
    auto zbuf = zeroed<float>(kFwdRows * kFwdTokens);
    auto stats = zeroed<float>(3 * kFwdTokens);
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t n0 = blk * kFwdTokens, nn = std::min(kFwdTokens, N - n0);
      float *m = stats.get(), *s = m + kFwdTokens, *u = s + kFwdTokens;
      std::fill(m, m + kFwdTokens, -1e30f);  // finite, so the first rescale is exp(-huge) = 0, never inf - inf
      std::fill(s, s + 2 * kFwdTokens, 0.f);
      const __m512 it = _mm512_set1_ps(inv_temp);
      sweep_vocab(head, hk.get(), nullptr, nullptr, n0, nn, zbuf.get(), nullptr, [&](int64_t v0, int64_t nv,
                                                                                       int64_t nnp) CAI_AMX {
        for (int64_t g = 0; g < nnp; g += 16) {
          const float* z = zbuf.get() + g;
          __m512 cm = _mm512_set1_ps(-1e30f);
          for (int64_t v = 0; v < nv; ++v) {
            const __m512 zs = _mm512_mul_ps(_mm512_add_ps(_mm512_load_ps(z + v * kFwdTokens),
                                                          _mm512_set1_ps(head.bias_at(v0 + v))), it);
            cm = _mm512_max_ps(cm, zs);
          }
          const __m512 m_old = _mm512_load_ps(m + g), m_new = _mm512_max_ps(m_old, cm);
          const __m512 alpha = exp_nonpositive16(_mm512_sub_ps(m_old, m_new));
          __m512 sv = _mm512_load_ps(s + g), uv = _mm512_load_ps(u + g);
          // sum e (zs - m_new) = alpha * (u + s (m_old - m_new)) for the entries seen so far
          uv = _mm512_mul_ps(alpha, _mm512_fmadd_ps(sv, _mm512_sub_ps(m_old, m_new), uv));
          sv = _mm512_mul_ps(alpha, sv);
          for (int64_t v = 0; v < nv; ++v) {
            const __m512 zs = _mm512_mul_ps(_mm512_add_ps(_mm512_load_ps(z + v * kFwdTokens),
                                                          _mm512_set1_ps(head.bias_at(v0 + v))), it);
            const __m512 dz = _mm512_sub_ps(zs, m_new);
            const __m512 e = exp_nonpositive16(dz);
            sv = _mm512_add_ps(sv, e);
            uv = _mm512_fmadd_ps(e, _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(e, _mm512_setzero_ps(), _CMP_GT_OQ),
                                                        dz), uv);
          }
          _mm512_store_ps(m + g, m_new);
          _mm512_store_ps(s + g, sv);
          _mm512_store_ps(u + g, uv);
        }
      });
      for (int64_t i = 0; i < nn; ++i) {
        const int64_t n = n0 + i;
        const float log_sum = std::log(s[i]);
        ls[n] = m[i] + log_sum;
        const bool ignored = y[n] == ignore_index;
        lp[n] = ignored ? 0.f : zy[n] * inv_temp - ls[n];
        if (ent) ent[n] = ignored ? 0.f : log_sum - u[i] / s[i];
      }
    }
    release_tiles();
  }
}

}  // namespace

void logprob_forward_bf16(bf16_array hidden, bf16_array weight, py::object bias, i64_array labels, float inv_temp,
                          int64_t ignore_index, f32_out logp, f32_out lse, py::object entropy) {
  require_kernels();
  const Operands op = check_head(hidden, weight, "hidden", "weight");
  const int64_t N = op.N, V = op.V;
  check_ndim(labels, 1, "labels");
  check_dim(labels, 0, N, "labels");
  f32_array bias_keep;
  const float* b = bias_ptr(bias, V, "bias", bias_keep);
  float* lp = f32_out_ptr(logp, N, "logp");
  float* ls = f32_out_ptr(lse, N, "lse");
  float* ent = f32_out_ptr(entropy, N, "entropy");
  const int64_t* y = labels.data();
  check_labels(y, N, V, ignore_index);
  py::gil_scoped_release nogil;
  if (N > 0)
    logprob_forward_impl(op.h, reinterpret_cast<const uint16_t*>(weight.data()), b, y, N, V, op.d, inv_temp,
                         ignore_index, lp, ls, ent);
}

namespace {

CAI_AMX void kl_forward_impl(const uint16_t* h, const uint16_t* w, const float* b, const uint16_t* rh,
                            const uint16_t* rw, const float* rb, int64_t N, int64_t V, int64_t d, int64_t rd,
                            float inv_temp, float* k, float* ls, float* md) {
  Head head(w, b, V, d);
  Head ref(rw, rb, V, rd);
  const int64_t Np = round_up(N, kTile);
  auto hk = pack_tokens_by_k(h, N, d, Np, head.Kp);
  auto rk = pack_tokens_by_k(rh, N, rd, Np, ref.Kp);
  const int64_t blocks = (N + kFwdTokens - 1) / kFwdTokens;
#pragma omp parallel
  {
    configure_tiles();
    auto zbuf = zeroed<float>(kFwdRows * kFwdTokens), rbuf = zeroed<float>(kFwdRows * kFwdTokens);
    auto stats = zeroed<float>(5 * kFwdTokens);
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t n0 = blk * kFwdTokens, nn = std::min(kFwdTokens, N - n0);
      // policy max / sum / sum e (zs - rs), reference max / sum
      float *mz = stats.get(), *sz = mz + kFwdTokens, *w = sz + kFwdTokens, *mr = w + kFwdTokens,
            *sr = mr + kFwdTokens;
      std::fill(mz, mz + kFwdTokens, -1e30f);
      std::fill(mr, mr + kFwdTokens, -1e30f);
      std::fill(sz, sz + 2 * kFwdTokens, 0.f);
      std::fill(sr, sr + kFwdTokens, 0.f);
      const __m512 it = _mm512_set1_ps(inv_temp);
      sweep_vocab(head, hk.get(), &ref, rk.get(), n0, nn, zbuf.get(), rbuf.get(), [&](int64_t v0, int64_t nv,
                                                                                         int64_t nnp) CAI_AMX {
        for (int64_t g = 0; g < nnp; g += 16) {
          const float *z = zbuf.get() + g, *r = rbuf.get() + g;
          auto scaled = [&](const float* x, const Head& hd, int64_t v) CAI_AMX {
            return _mm512_mul_ps(_mm512_add_ps(_mm512_load_ps(x + v * kFwdTokens), _mm512_set1_ps(hd.bias_at(v0 + v))),
                                 it);
          };
          __m512 cz = _mm512_set1_ps(-1e30f), cr = cz;
          for (int64_t v = 0; v < nv; ++v) {
            cz = _mm512_max_ps(cz, scaled(z, head, v));
            cr = _mm512_max_ps(cr, scaled(r, ref, v));
          }
          const __m512 mz_old = _mm512_load_ps(mz + g), mz_new = _mm512_max_ps(mz_old, cz);
          const __m512 mr_old = _mm512_load_ps(mr + g), mr_new = _mm512_max_ps(mr_old, cr);
          const __m512 az = exp_nonpositive16(_mm512_sub_ps(mz_old, mz_new));
          const __m512 ar = exp_nonpositive16(_mm512_sub_ps(mr_old, mr_new));
          __m512 szv = _mm512_mul_ps(az, _mm512_load_ps(sz + g)), wv = _mm512_mul_ps(az, _mm512_load_ps(w + g));
          __m512 srv = _mm512_mul_ps(ar, _mm512_load_ps(sr + g));
          for (int64_t v = 0; v < nv; ++v) {
            const __m512 zs = scaled(z, head, v), rs = scaled(r, ref, v);
            const __m512 e = exp_nonpositive16(_mm512_sub_ps(zs, mz_new));
            szv = _mm512_add_ps(szv, e);
            wv = _mm512_fmadd_ps(e, _mm512_sub_ps(zs, rs), wv);
            srv = _mm512_add_ps(srv, exp_nonpositive16(_mm512_sub_ps(rs, mr_new)));
          }
          _mm512_store_ps(mz + g, mz_new);
          _mm512_store_ps(mr + g, mr_new);
          _mm512_store_ps(sz + g, szv);
          _mm512_store_ps(w + g, wv);
          _mm512_store_ps(sr + g, srv);
        }
      });
      for (int64_t i = 0; i < nn; ++i) {
        const int64_t n = n0 + i;
        const float lse_z = mz[i] + std::log(sz[i]), lse_r = mr[i] + std::log(sr[i]);
        ls[n] = lse_z;
        md[n] = w[i] / sz[i];
        k[n] = md[n] - lse_z + lse_r;
      }
    }
    release_tiles();
  }
}

}  // namespace

void kl_forward_bf16(bf16_array hidden, bf16_array weight, py::object bias, bf16_array ref_hidden,
                     bf16_array ref_weight, py::object ref_bias, float inv_temp, f32_out kl, f32_out lse,
                     f32_out mean_diff) {
  require_kernels();
  const Operands op = check_head(hidden, weight, "hidden", "weight");
  const Operands rop = check_head(ref_hidden, ref_weight, "ref_hidden", "ref_weight");
  const int64_t N = op.N, V = op.V;
  check_dim(ref_hidden, 0, N, "ref_hidden");
  check_dim(ref_weight, 0, V, "ref_weight");
  f32_array bkeep, rbkeep;
  const float* b = bias_ptr(bias, V, "bias", bkeep);
  const float* rb = bias_ptr(ref_bias, V, "ref_bias", rbkeep);
  float *k = f32_out_ptr(kl, N, "kl"), *ls = f32_out_ptr(lse, N, "lse"), *md = f32_out_ptr(mean_diff, N, "mean_diff");
  py::gil_scoped_release nogil;
  if (N > 0)
    kl_forward_impl(op.h, reinterpret_cast<const uint16_t*>(weight.data()), b, rop.h,
                    reinterpret_cast<const uint16_t*>(ref_weight.data()), rb, N, V, op.d, rop.d, inv_temp, k, ls, md);
}

// ---------------------------------------------------------------- backward sweep

namespace {

struct Grads {
  uint16_t* dh;  // [N, d] bf16 or null
  uint16_t* dw;  // [V, d] bf16 or null
  float* db;     // [V] or null
};

// Per vocabulary block: for every token tile, recompute the logits (and the reference's), let `dz_rows`
// turn row v of the tile into dL/dz (16 tokens per vector), store it as bf16 in two layouts, and
// accumulate dW (block-local, fp32) and dh^T (per thread, fp32).
template <class DzRow>
CAI_AMX void backward_sweep(const uint16_t* h, int64_t N, Head& head, const uint16_t* rh, Head* ref, Grads out,
                            DzRow&& dz_row) {
  const int64_t V = head.V, d = head.d, Kp = head.Kp, Np = round_up(N, kTile);
  auto hk = pack_tokens_by_k(h, N, d, Np, Kp);
  Buffer<uint32_t> rk;
  if (ref) rk = pack_tokens_by_k(rh, N, ref->d, Np, ref->Kp);
  Buffer<uint16_t> hp;
  if (out.dw) hp = pack_tokens_by_pairs(h, N, d, Np, Kp);
  const int threads = max_threads();
  // dh^T partials, one per thread, by token tile ([N / kBwdTokens][Kp][kBwdTokens]) so each tile's
  // accumulators are one contiguous 64-byte-strided block: row strides of the whole [Kp, N] would touch a
  // different page per row and thrash the TLB.
  const int64_t Nb = round_up(N, kBwdTokens);
  std::vector<Buffer<float>> dht(threads);
  const int64_t blocks = (V + kBwdRows - 1) / kBwdRows;
#pragma omp parallel num_threads(threads)
  {
    const int t = thread_id();
    if (out.dh) dht[t] = zeroed<float>(Kp * Nb);
    configure_tiles();
    auto zbuf = zeroed<float>(kBwdRows * kBwdTokens);
    auto rbuf = ref ? zeroed<float>(kBwdRows * kBwdTokens) : Buffer<float>();
    auto dz_plain = zeroed<uint16_t>(kBwdRows * kBwdTokens);  // [v][n]
    auto dz_pairs = zeroed<uint16_t>(kBwdRows * kBwdTokens);  // [v/2][n][2]: B operand of dh^T
    auto dw_acc = zeroed<float>(kBwdRows * Kp);
    auto w_t = out.dh ? zeroed<uint16_t>(Kp * kBwdRows) : Buffer<uint16_t>();
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                                22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t v0 = blk * kBwdRows, nv = std::min(kBwdRows, V - v0), nvp = round_up(nv, kTile);
      std::memset(dw_acc.get(), 0, kBwdRows * Kp * sizeof(float));
      if (out.dh) head.transpose_block(v0, kBwdRows, w_t.get());
      float db_rows[kBwdRows] = {};
      for (int64_t n0 = 0; n0 < N; n0 += kBwdTokens) {
        const int64_t nnp = round_up(std::min(kBwdTokens, N - n0), kTile);
        weight_tiles(head, hk.get(), v0, nvp, n0, nnp, zbuf.get(), kBwdTokens);
        if (ref) weight_tiles(*ref, rk.get(), v0, nvp, n0, nnp, rbuf.get(), kBwdTokens);
        for (int64_t v = 0; v < nvp; v += 2) {
          for (int64_t g = 0; g < nnp; g += 16) {
            __m512 d0 = _mm512_setzero_ps(), d1 = d0;
            if (v < nv) d0 = dz_row(zbuf.get() + v * kBwdTokens + g, ref ? rbuf.get() + v * kBwdTokens + g : nullptr,
                                    v0 + v, n0 + g);
            if (v + 1 < nv)
              d1 = dz_row(zbuf.get() + (v + 1) * kBwdTokens + g,
                          ref ? rbuf.get() + (v + 1) * kBwdTokens + g : nullptr, v0 + v + 1, n0 + g);
            if (n0 + g + 16 > N) {  // padding tokens: zero, whatever their (bias-only) logits gave
              const int64_t left = N - n0 - g;  // real tokens in these 16 lanes: 0 to 15
              const __mmask16 valid = left > 0 ? __mmask16((1u << left) - 1) : 0;
              d0 = _mm512_maskz_mov_ps(valid, d0);
              d1 = _mm512_maskz_mov_ps(valid, d1);
            }
            // round once; both layouts and the bias gradient see the same bf16 values' fp32 source
            const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(d1, d0);  // lanes 0-15: row v, 16-31: row v + 1
            _mm256_store_si256((__m256i*)(dz_plain.get() + v * kBwdTokens + g), _mm512_castsi512_si256(both));
            _mm256_store_si256((__m256i*)(dz_plain.get() + (v + 1) * kBwdTokens + g),
                               _mm512_extracti64x4_epi64(both, 1));
            _mm512_store_si512(dz_pairs.get() + (v / 2) * kBwdTokens * 2 + g * 2,
                               _mm512_permutexvar_epi16(interleave, both));
            if (out.db) {
              db_rows[v] += _mm512_reduce_add_ps(d0);
              db_rows[v + 1] += _mm512_reduce_add_ps(d1);
            }
          }
        }
        if (out.dw)  // dW[v, c] += sum_n dz[v, n] h[n, c]
          for (int64_t vi = 0; vi < nvp; vi += kTile)
            for (int64_t ci = 0; ci < Kp; ci += kTile)
              tile_2x2(dz_plain.get() + vi * kBwdTokens, kBwdTokens * 2, 64, hp.get() + (n0 / 2) * Kp * 2 + ci * 2,
                       64, Kp * 4, 16 * Kp * 4, nnp / kTile, dw_acc.get() + vi * Kp + ci, Kp * 4, true);
        if (out.dh)  // dh^T[c, n] += sum_v W^T[c, v] dz[v, n]
          for (int64_t ci = 0; ci < Kp; ci += kTile)
            for (int64_t ni = 0; ni < nnp; ni += kTile) {
              float* c = dht[t].get() + n0 * Kp + ci * kBwdTokens + ni;
              const bool last = ci + kTile >= Kp && ni + kTile >= nnp;
              tile_2x2(w_t.get() + ci * kBwdRows, kBwdRows * 2, 64, dz_pairs.get() + ni * 2, 64,
                       kBwdTokens * 4, 16 * kBwdTokens * 4, nvp / kTile, c, kBwdTokens * 4, true,
                       last ? nullptr : ni + kTile < nnp ? c + kTile : c + kTile * kBwdTokens - ni);
            }
      }
      if (out.dw)
        for (int64_t v = 0; v < nv; ++v)
          for (int64_t c = 0; c < d; ++c) out.dw[(v0 + v) * d + c] = float_to_bf16(dw_acc[v * Kp + c]);
      if (out.db)
        for (int64_t v = 0; v < nv; ++v) out.db[v0 + v] = db_rows[v];
    }
    release_tiles();
  }
  if (out.dh) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < d; ++c) {
        float s = 0.f;
        for (int t = 0; t < threads; ++t)
          if (dht[t]) s += dht[t][(n / kBwdTokens) * kBwdTokens * Kp + c * kBwdTokens + n % kBwdTokens];
        out.dh[n * d + c] = float_to_bf16(s);
      }
  }
}

// Per-token arrays padded to a multiple of 16 tokens with zeros (zero upstream gradient: padded lanes give dz = 0).
Buffer<float> padded_copy(const float* x, int64_t N) {
  auto out = zeroed<float>(round_up(N, kTile));
  std::memcpy(out.get(), x, N * sizeof(float));
  return out;
}

// An empty batch, or no gradient asked for: the weight and bias gradients are zeros (they are outputs the
// caller reads), and there is nothing to sweep.
bool nothing_to_sweep(const Grads& out, int64_t N, int64_t V, int64_t d) {
  if (N > 0 && (out.dh || out.dw || out.db)) return false;
  if (out.dw) std::memset(out.dw, 0, V * d * 2);
  if (out.db) std::memset(out.db, 0, V * sizeof(float));
  return true;
}

}  // namespace

void logprob_backward_bf16(bf16_array hidden, bf16_array weight, py::object bias, i64_array labels, float inv_temp,
                           f32_array lse, f32_array entropy, f32_array grad_logp, f32_array grad_entropy,
                           py::object grad_hidden, py::object grad_weight, py::object grad_bias) {
  require_kernels();
  const Operands op = check_head(hidden, weight, "hidden", "weight");
  const int64_t N = op.N, V = op.V, d = op.d;
  check_ndim(labels, 1, "labels");
  check_dim(labels, 0, N, "labels");
  f32_array bias_keep;
  const float* b = bias_ptr(bias, V, "bias", bias_keep);
  const float *ls = f32_in(lse, N, "lse"), *ent = f32_in(entropy, N, "entropy"),
              *glp = f32_in(grad_logp, N, "grad_logp"), *gent = f32_in(grad_entropy, N, "grad_entropy");
  Grads out{bf16_out(grad_hidden, N, d, "grad_hidden"), bf16_out(grad_weight, V, d, "grad_weight"),
            f32_out_ptr(grad_bias, V, "grad_bias")};
  const int64_t* y = labels.data();
  py::gil_scoped_release nogil;
  if (nothing_to_sweep(out, N, V, d)) return;
  Head head(reinterpret_cast<const uint16_t*>(weight.data()), b, V, d);
  auto lse_p = padded_copy(ls, N), glp_p = padded_copy(glp, N), gent_p = padded_copy(gent, N);
  auto mean_p = zeroed<float>(round_up(N, kTile));
  auto label_p = zeroed<int32_t>(round_up(N, kTile));
  for (int64_t n = 0; n < round_up(N, kTile); ++n) {
    if (n < N) mean_p[n] = ls[n] - ent[n];  // E[zs] = lse - entropy
    label_p[n] = n < N && y[n] >= 0 && y[n] < V ? int32_t(y[n]) : -1;
  }
  backward_sweep(op.h, N, head, nullptr, nullptr, out, [&](const float* z, const float*, int64_t v, int64_t n) CAI_AMX {
    // dz = inv_temp * (g_lp * (onehot - p) - g_ent * p * (zs - E[zs]))
    const __m512 it = _mm512_set1_ps(inv_temp);
    const __m512 zs = _mm512_mul_ps(_mm512_add_ps(_mm512_load_ps(z), _mm512_set1_ps(head.bias_at(v))), it);
    const __m512 p = exp_nonpositive16(_mm512_sub_ps(zs, _mm512_load_ps(lse_p.get() + n)));
    const __m512 g = _mm512_load_ps(glp_p.get() + n);
    const __m512 coef = _mm512_fmadd_ps(_mm512_load_ps(gent_p.get() + n),
                                        _mm512_sub_ps(zs, _mm512_load_ps(mean_p.get() + n)), g);
    __m512 dz = _mm512_mul_ps(_mm512_mul_ps(p, coef), _mm512_set1_ps(-inv_temp));
    const __mmask16 hit = _mm512_cmpeq_epi32_mask(_mm512_load_si512(label_p.get() + n), _mm512_set1_epi32(int32_t(v)));
    return _mm512_mask3_fmadd_ps(g, it, dz, hit);  // lanes whose label is v: g * inv_temp + dz
  });
}

void kl_backward_bf16(bf16_array hidden, bf16_array weight, py::object bias, bf16_array ref_hidden,
                      bf16_array ref_weight, py::object ref_bias, float inv_temp, f32_array lse, f32_array mean_diff,
                      f32_array grad_kl, py::object grad_hidden, py::object grad_weight, py::object grad_bias) {
  require_kernels();
  const Operands op = check_head(hidden, weight, "hidden", "weight");
  const Operands rop = check_head(ref_hidden, ref_weight, "ref_hidden", "ref_weight");
  const int64_t N = op.N, V = op.V, d = op.d;
  check_dim(ref_hidden, 0, N, "ref_hidden");
  check_dim(ref_weight, 0, V, "ref_weight");
  f32_array bkeep, rbkeep;
  const float* b = bias_ptr(bias, V, "bias", bkeep);
  const float* rb = bias_ptr(ref_bias, V, "ref_bias", rbkeep);
  const float *ls = f32_in(lse, N, "lse"), *md = f32_in(mean_diff, N, "mean_diff"), *g = f32_in(grad_kl, N, "grad_kl");
  Grads out{bf16_out(grad_hidden, N, d, "grad_hidden"), bf16_out(grad_weight, V, d, "grad_weight"),
            f32_out_ptr(grad_bias, V, "grad_bias")};
  py::gil_scoped_release nogil;
  if (nothing_to_sweep(out, N, V, d)) return;
  Head head(reinterpret_cast<const uint16_t*>(weight.data()), b, V, d);
  Head ref(reinterpret_cast<const uint16_t*>(ref_weight.data()), rb, V, rop.d);
  auto lse_p = padded_copy(ls, N), md_p = padded_copy(md, N), g_p = padded_copy(g, N);
  backward_sweep(op.h, N, head, rop.h, &ref, out, [&](const float* z, const float* r, int64_t v, int64_t n) CAI_AMX {
    // dKL/dz = inv_temp * g * p * ((zs - rs) - E_p[zs - rs])
    const __m512 it = _mm512_set1_ps(inv_temp);
    const __m512 zs = _mm512_mul_ps(_mm512_add_ps(_mm512_load_ps(z), _mm512_set1_ps(head.bias_at(v))), it);
    const __m512 rs = _mm512_mul_ps(_mm512_add_ps(_mm512_load_ps(r), _mm512_set1_ps(ref.bias_at(v))), it);
    const __m512 p = exp_nonpositive16(_mm512_sub_ps(zs, _mm512_load_ps(lse_p.get() + n)));
    const __m512 diff = _mm512_sub_ps(_mm512_sub_ps(zs, rs), _mm512_load_ps(md_p.get() + n));
    return _mm512_mul_ps(_mm512_mul_ps(_mm512_load_ps(g_p.get() + n), it), _mm512_mul_ps(p, diff));
  });
}
