// Paged-attention decode on CPU: one new query per sequence against its KV blocks, read in place
// through the block table (no gather), one block at a time with an online softmax. Threads take
// (sequence, KV head) pairs; the G query heads of a GQA group share each K/V row they load.
// The cache holds float32 or bfloat16 (its raw 16-bit patterns); queries, scores, the softmax, the
// log-sum-exp and the output are float32 either way. A bf16 row is widened to float32 in registers
// (bf16 is the top half of a float32: a zero-extend and a shift), never copied out of the cache.
#include "paged_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define CAI_HAVE_AVX512_PATH 1
#endif

#include "vecmath.h"

namespace {

inline float widen(float x) { return x; }
inline float widen(uint16_t bits) {
  const uint32_t w = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &w, sizeof f);
  return f;
}

// One block of n <= BS keys for the G query rows of a KV head: scores, then the online-softmax update
// of each row's running max m, sum l and unnormalised output acc [G, D]. One function so every loop
// (the dots, the exps, the axpys) is compiled, and vectorised, for the clone's instruction set.
template <typename T>
CAI_MULTIVERSION void attend_block(const float* q, int64_t G, const T* k, const T* v, int64_t n, int64_t D,
                                   int64_t row_stride, float* m, float* l, float* acc, float* s) {
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = q + g * D;
    float* sg = s + g * n;
    for (int64_t t = 0; t < n; ++t) {
      const T* kt = k + t * row_stride;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += qg[d] * widen(kt[d]);
      sg[t] = dot;
    }
    float m_new = m[g];
#pragma omp simd reduction(max : m_new)
    for (int64_t t = 0; t < n; ++t) m_new = sg[t] > m_new ? sg[t] : m_new;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < n; ++t) {
      sg[t] = exp_nonpositive(sg[t] - m_new);
      sum += sg[t];
    }
    const float alpha = exp_nonpositive(m[g] - m_new);  // m = -inf before the first block: alpha = 0
    l[g] = l[g] * alpha + sum;
    m[g] = m_new;
    float* ag = acc + g * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) ag[d] *= alpha;
    for (int64_t t = 0; t < n; ++t) {
      const float p = sg[t];
      const T* vt = v + t * row_stride;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) ag[d] += p * widen(vt[d]);
    }
  }
}

#ifdef CAI_HAVE_AVX512_PATH
// bf16 cache, head_dim a multiple of 16: each K/V row is loaded once, widened in registers, and used by
// all G query rows of the group (the generic version above reloads it per row). Chosen at run time.
__attribute__((target("avx512f"))) inline __m512 load_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

__attribute__((target("avx512f"))) void attend_block_avx512(const float* q, int64_t G, const uint16_t* k,
                                                            const uint16_t* v, int64_t n, int64_t D,
                                                            int64_t row_stride, float* m, float* l, float* acc,
                                                            float* s) {
  for (int64_t t = 0; t < n; ++t) {
    const uint16_t* kt = k + t * row_stride;
    for (int64_t g = 0; g < G; ++g) {
      __m512 dot = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 16) dot = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * D + d), load_bf16(kt + d), dot);
      s[g * n + t] = _mm512_reduce_add_ps(dot);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* sg = s + g * n;
    float m_new = m[g];
    for (int64_t t = 0; t < n; ++t) m_new = sg[t] > m_new ? sg[t] : m_new;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < n; ++t) {
      sg[t] = exp_nonpositive(sg[t] - m_new);
      sum += sg[t];
    }
    const float alpha = exp_nonpositive(m[g] - m_new);
    l[g] = l[g] * alpha + sum;
    m[g] = m_new;
    const __m512 a = _mm512_set1_ps(alpha);
    for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(acc + g * D + d, _mm512_mul_ps(a, _mm512_loadu_ps(acc + g * D + d)));
  }
  for (int64_t t = 0; t < n; ++t) {
    const uint16_t* vt = v + t * row_stride;
    for (int64_t d = 0; d < D; d += 16) {
      const __m512 vd = load_bf16(vt + d);
      for (int64_t g = 0; g < G; ++g) {
        float* ag = acc + g * D + d;
        _mm512_storeu_ps(ag, _mm512_fmadd_ps(_mm512_set1_ps(s[g * n + t]), vd, _mm512_loadu_ps(ag)));
      }
    }
  }
}
#endif

template <typename T>
void decode(const float* qp, const T* kp, const T* vp, const int32_t* tab, const int32_t* lens, int64_t B, int64_t H,
            int64_t D, int64_t BS, int64_t KV, int64_t W, float scale, float* op, float* lp, int64_t first_block) {
  const int64_t G = H / KV;
  bool wide = false;
#ifdef CAI_HAVE_AVX512_PATH
  if constexpr (std::is_same_v<T, uint16_t>) wide = D % 16 == 0 && __builtin_cpu_supports("avx512f");
#endif
#pragma omp parallel
  {
    std::vector<float> qs(G * D), scores(G * BS), m(G), l(G);
#pragma omp for schedule(dynamic) collapse(2)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t kvh = 0; kvh < KV; ++kvh) {
        const int64_t head = b * H + kvh * G;
        for (int64_t i = 0; i < G * D; ++i) qs[i] = qp[head * D + i] * scale;
        std::fill(m.begin(), m.end(), -INFINITY);
        std::fill(l.begin(), l.end(), 0.f);
        float* o = op + head * D;
        std::fill(o, o + G * D, 0.f);
        for (int64_t blk = first_block; blk * BS < lens[b]; ++blk) {
          const int64_t base = (static_cast<int64_t>(tab[b * W + blk]) * BS * KV + kvh) * D;
          const int64_t n = std::min<int64_t>(BS, lens[b] - blk * BS);
#ifdef CAI_HAVE_AVX512_PATH
          if constexpr (std::is_same_v<T, uint16_t>) {
            if (wide) {
              attend_block_avx512(qs.data(), G, kp + base, vp + base, n, D, KV * D, m.data(), l.data(), o,
                                  scores.data());
              continue;
            }
          }
#endif
          attend_block<T>(qs.data(), G, kp + base, vp + base, n, D, KV * D, m.data(), l.data(), o, scores.data());
        }
        for (int64_t g = 0; g < G; ++g) {  // no key past first_block: an empty partial (0, -inf)
          const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
          for (int64_t d = 0; d < D; ++d) o[g * D + d] *= inv;
          if (lp) lp[head + g] = l[g] > 0.f ? m[g] + std::log(l[g]) : -INFINITY;
        }
      }
    }
  }
}

}  // namespace

void check_block_tables(const int32_t* tables, const int32_t* lens, int64_t B, int64_t W, int64_t NB, int64_t BS,
                        int64_t first_block) {
  for (int64_t b = 0; b < B; ++b) {
    if (lens[b] < 1 || (lens[b] + BS - 1) / BS > W)
      throw std::invalid_argument("context_lens[" + std::to_string(b) + "] = " + std::to_string(lens[b]) +
                                  " does not fit its block table of " + std::to_string(W) + " blocks");
    for (int64_t i = first_block; i < (lens[b] + BS - 1) / BS; ++i)
      if (tables[b * W + i] < 0 || tables[b * W + i] >= NB)
        throw std::invalid_argument("block_tables[" + std::to_string(b) + "][" + std::to_string(i) +
                                    "] is not a block of the cache");
  }
}

void paged_decode(f32_array q, py::array k_cache, py::array v_cache, i32_array block_tables, i32_array context_lens,
                  float scale, f32_out out, std::optional<f32_out> lse, int64_t first_block) {
  check_ndim(q, 3, "q");
  check_ndim(k_cache, 4, "k_cache");
  check_ndim(v_cache, 4, "v_cache");
  check_ndim(block_tables, 2, "block_tables");
  const bool bf16 = k_cache.dtype().itemsize() == 2 && k_cache.dtype().kind() != 'f';
  if (!bf16 && !k_cache.dtype().is(py::dtype::of<float>()))
    throw std::invalid_argument("k_cache: expected float32 or bfloat16 bits (int16/uint16), got " +
                                std::string(py::str(k_cache.dtype())));
  if (!v_cache.dtype().is(k_cache.dtype()) && !(bf16 && v_cache.dtype().itemsize() == 2 && v_cache.dtype().kind() != 'f'))
    throw std::invalid_argument("v_cache: expected the dtype of k_cache");
  if (!(k_cache.flags() & py::array::c_style) || !(v_cache.flags() & py::array::c_style))
    throw std::invalid_argument("k_cache, v_cache: expected C-contiguous arrays");
  const int64_t B = q.shape(0), H = q.shape(1), D = q.shape(2);
  const int64_t BS = k_cache.shape(1), KV = k_cache.shape(2), W = block_tables.shape(1), NB = k_cache.shape(0);
  check_dim(k_cache, 3, D, "k_cache");
  for (int axis = 0; axis < 4; ++axis) check_dim(v_cache, axis, k_cache.shape(axis), "v_cache");
  check_dim(block_tables, 0, B, "block_tables");
  check_dim(context_lens, 0, B, "context_lens");
  if (H % KV) throw std::invalid_argument("q heads must be a multiple of the cache's KV heads");
  for (int axis = 0; axis < 3; ++axis) check_dim(out, axis, q.shape(axis), "out");
  if (lse) {
    check_ndim(*lse, 2, "lse");
    check_dim(*lse, 0, B, "lse");
    check_dim(*lse, 1, H, "lse");
  }
  if (first_block < 0) throw std::invalid_argument("first_block must be >= 0");
  const int32_t *tab = block_tables.data(), *lens = context_lens.data();
  check_block_tables(tab, lens, B, W, NB, BS, first_block);
  float* op = out.mutable_data();
  float* lp = lse ? lse->mutable_data() : nullptr;
  const float* qp = q.data();
  py::gil_scoped_release nogil;
  if (bf16)
    decode(qp, static_cast<const uint16_t*>(k_cache.data()), static_cast<const uint16_t*>(v_cache.data()), tab, lens,
           B, H, D, BS, KV, W, scale, op, lp, first_block);
  else
    decode(qp, static_cast<const float*>(k_cache.data()), static_cast<const float*>(v_cache.data()), tab, lens, B, H,
           D, BS, KV, W, scale, op, lp, first_block);
}
