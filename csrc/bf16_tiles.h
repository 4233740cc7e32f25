// AMX-BF16 tile GEMM building blocks shared by the bf16 kernels (fused log-prob / KL, linear layers): CPU
// detection and dispatch, tile configuration, the 32 x 32 tile product (AMX, or VDPBF16PS vectors on CPUs
// without AMX), and the operand layouts (weights as A rows, tokens packed as VNNI B columns).
//
// Everything that executes AMX or AVX-512 instructions carries a target attribute, and the entry points
// refuse to run unless bf16_kernels_available() (cpuid + OS state) said yes, so the module still imports and
// runs its fp32 paths on CPUs without these instructions. Functions are inline (one CPU probe and one
// `use_amx` flag for the whole module).
#pragma once

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#define CAI_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

namespace bf16_tiles {

constexpr int64_t kTile = 32;          // one 2 x 2 block of 16 x 16 accumulators

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

template <class T>
struct AlignedFree {
  void operator()(T* p) const { std::free(p); }
};
template <class T>
using Buffer = std::unique_ptr<T[], AlignedFree<T>>;

// n elements, 64-byte aligned, contents undefined (for buffers every element of which is written before it is read)
template <class T>
inline Buffer<T> uninitialized(int64_t n) {
  T* p = static_cast<T*>(std::aligned_alloc(64, round_up(std::max<int64_t>(n, 1) * sizeof(T), 64)));
  if (!p) throw std::bad_alloc();
  return Buffer<T>(p);
}

template <class T>
inline Buffer<T> zeroed(int64_t n) {
  Buffer<T> out = uninitialized<T>(n);
  std::memset(out.get(), 0, round_up(std::max<int64_t>(n, 1) * sizeof(T), 64));
  return out;
}

// ---------------------------------------------------------------- dispatch

struct Cpu {
  bool avx512_bf16 = false;  // AVX-512 F/DQ/BW/VL + AVX512-BF16 with the OS saving ZMM state: VDPBF16PS
  bool amx = false;          // and AMX-BF16 tiles the OS hands out: TDPBF16PS
  bool amd = false;          // AuthenticAMD
};

inline Cpu detect() {
  Cpu cpu;
  unsigned a, b, c, d;
  if (__get_cpuid(0, &a, &b, &c, &d)) cpu.amd = b == 0x68747541 && d == 0x69746e65 && c == 0x444d4163;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return cpu;
  const bool avx512 = (b >> 16 & 1) && (b >> 17 & 1) && (b >> 30 & 1) && (b >> 31 & 1);  // f, dq, bw, vl
  const bool amx = (d >> 22 & 1) && (d >> 24 & 1);                                       // amx-bf16, amx-tile
  if (!avx512 || !__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a >> 5 & 1)) return cpu;  // avx512-bf16
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c >> 27 & 1)) return cpu;                     // OSXSAVE
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  const uint64_t xcr0 = (uint64_t(hi) << 32) | lo;
  if ((xcr0 & 0xe6) != 0xe6) return cpu;  // SSE/AVX/opmask/ZMM state
  cpu.avx512_bf16 = true;
  // tile config + data state, and Linux hands out the 8 KiB tile state only on request (ARCH_REQ_XCOMP_PERM)
  cpu.amx = amx && (xcr0 >> 17 & 3) == 3 && syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return cpu;
}

inline const Cpu& cpu() {
  static const Cpu found = detect();
  return found;
}

// Which dot product the tile GEMMs use in the current call: AMX tiles where present, else VDPBF16PS vectors
// (CAI_ENGINE_AMX=0 forces the vectors, so tests and benchmarks cover both on an AMX machine). Set at each
// entry point before any thread starts; a call never mixes the two.
inline std::atomic<bool> use_amx{false};

inline void require_kernels() {
  if (!cpu().avx512_bf16)
    throw std::runtime_error("bf16 kernels: this CPU (or OS) lacks AVX512-BF16; use the fp32 path");
  const char* env = std::getenv("CAI_ENGINE_AMX");
  use_amx = cpu().amx && !(env && std::string(env) == "0");
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tmm0-3: fp32 accumulators, tmm4-5: A (16 rows x 32 bf16), tmm6-7: B (16 pair rows x 16 columns): all 16 x 64 B
CAI_AMX inline void configure_tiles() {
  if (!use_amx) return;
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

CAI_AMX inline void release_tiles() {
  if (use_amx) _tile_release();
}

// tile_2x2 below on CPUs without AMX: the same operands, VDPBF16PS on 16-float rows. TDPBF16PS computes
// C[m][n] += sum_p A[m] pair p . B[p] pair n, so each pair p of A row m, broadcast, meets B pair row p:
// 8 rows of C (16 zmm accumulators) at a time, B's pair rows re-read from L1 for each group of rows.
constexpr int64_t kContiguous = INT64_MIN;  // the default a_next of the tile products: rows 16-31 follow rows 0-15

template <int Halves>  // 2: C[32 x 32] as tile_2x2; 1: its left 16 columns, as tile_2x1
CAI_AMX inline void vector_tiles(const void* a, int64_t lda, int64_t a_step, const void* b, int64_t b_next,
                                 int64_t ldb, int64_t b_step, int64_t ksteps, float* c, int64_t ldc, bool accumulate,
                                 int64_t a_next) {
  constexpr int kRows = 8;
  char* cp = reinterpret_cast<char*>(c);
  for (int m0 = 0; m0 < 32; m0 += kRows) {
    __m512 acc[kRows][Halves];
    for (int i = 0; i < kRows; ++i)
      for (int half = 0; half < Halves; ++half)
        acc[i][half] = accumulate ? _mm512_loadu_ps(cp + (m0 + i) * ldc + 64 * half) : _mm512_setzero_ps();
    const char* ap = static_cast<const char*>(a) + (m0 < 16 ? m0 * lda : a_next + (m0 - 16) * lda);
    const char* bp = static_cast<const char*>(b);
    for (int64_t k = 0; k < ksteps; ++k, ap += a_step, bp += b_step) {
      for (int pair = 0; pair < 16; ++pair) {
        __m512bh bv[Halves];
        for (int half = 0; half < Halves; ++half)
          bv[half] = (__m512bh)_mm512_loadu_si512(bp + half * b_next + pair * ldb);
        for (int i = 0; i < kRows; ++i) {
          int32_t bits;
          std::memcpy(&bits, ap + i * lda + 4 * pair, sizeof bits);
          const __m512bh a_pair = (__m512bh)_mm512_set1_epi32(bits);
          for (int half = 0; half < Halves; ++half) acc[i][half] = _mm512_dpbf16_ps(acc[i][half], a_pair, bv[half]);
        }
      }
    }
    for (int i = 0; i < kRows; ++i)
      for (int half = 0; half < Halves; ++half) _mm512_storeu_ps(cp + (m0 + i) * ldc + 64 * half, acc[i][half]);
  }
}

// C[32 x 32] (+)= A[32 x 32k] . B[32k x 32]: A rows at `a` with stride lda (bytes), rows 16-31 at +a_next (default
// 16 * lda: one 32-row matrix; two KV-cache blocks elsewhere), next 32 columns at +a_step;
// B in pair-interleaved (VNNI) rows at `b` with stride ldb, its second 16 columns at +b_next, next 16 pair rows
// at +b_step; C rows with stride ldc. All strides in bytes.
// `prefetch` (optional): the next C block, requested while this one computes, since accumulators streamed
// from L3 (the dh^T partials) would otherwise stall every tile load.
CAI_AMX inline void tile_2x2(const void* a, int64_t lda, int64_t a_step, const void* b, int64_t b_next, int64_t ldb,
                             int64_t b_step, int64_t ksteps, float* c, int64_t ldc, bool accumulate,
                             const float* prefetch = nullptr, int64_t a_next = kContiguous) {
  if (a_next == kContiguous) a_next = 16 * lda;
  if (!use_amx) return vector_tiles<2>(a, lda, a_step, b, b_next, ldb, b_step, ksteps, c, ldc, accumulate, a_next);
  char* cp = reinterpret_cast<char*>(c);
  if (prefetch)
    for (int r = 0; r < 32; ++r) {
      const char* line = reinterpret_cast<const char*>(prefetch) + r * ldc;
      _mm_prefetch(line, _MM_HINT_T0);
      _mm_prefetch(line + 64, _MM_HINT_T0);
    }
  if (accumulate) {
    _tile_loadd(0, cp, ldc);
    _tile_loadd(1, cp + 64, ldc);
    _tile_loadd(2, cp + 16 * ldc, ldc);
    _tile_loadd(3, cp + 16 * ldc + 64, ldc);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  const char* ap = static_cast<const char*>(a);
  const char* bp = static_cast<const char*>(b);
  for (int64_t k = 0; k < ksteps; ++k, ap += a_step, bp += b_step) {
    _tile_loadd(4, ap, lda);
    _tile_loadd(5, ap + a_next, lda);
    _tile_loadd(6, bp, ldb);
    _tile_loadd(7, bp + b_next, ldb);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, cp, ldc);
  _tile_stored(1, cp + 64, ldc);
  _tile_stored(2, cp + 16 * ldc, ldc);
  _tile_stored(3, cp + 16 * ldc + 64, ldc);
}

// C[32 x 16] = A[32 x 32k] . B[32k x 16]: tile_2x2's left half, for the last 16 or fewer tokens of a call (a decode
// step of one sequence computes half the products).
CAI_AMX inline void tile_2x1(const void* a, int64_t lda, int64_t a_step, const void* b, int64_t b_next, int64_t ldb,
                             int64_t b_step, int64_t ksteps, float* c, int64_t ldc, int64_t a_next = kContiguous,
                             bool accumulate = false) {
  if (a_next == kContiguous) a_next = 16 * lda;
  if (!use_amx) return vector_tiles<1>(a, lda, a_step, b, b_next, ldb, b_step, ksteps, c, ldc, accumulate, a_next);
  char* cp = reinterpret_cast<char*>(c);
  if (accumulate) {
    _tile_loadd(0, cp, ldc);
    _tile_loadd(2, cp + 16 * ldc, ldc);
  } else {
    _tile_zero(0);
    _tile_zero(2);
  }
  const char* ap = static_cast<const char*>(a);
  const char* bp = static_cast<const char*>(b);
  for (int64_t k = 0; k < ksteps; ++k, ap += a_step, bp += b_step) {
    _tile_loadd(4, ap, lda);
    _tile_loadd(5, ap + a_next, lda);
    _tile_loadd(6, bp, ldb);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 5, 6);
  }
  _tile_stored(0, cp, ldc);
  _tile_stored(2, cp + 16 * ldc, ldc);
}

// 16 bf16 values (bit patterns) widened to fp32 lanes.
CAI_AMX inline __m512 widen_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// The scalar exp_nonpositive of vecmath.h, 16 lanes at a time.
CAI_AMX inline __m512 exp_nonpositive16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.0f);
  const __m512 xc = _mm512_max_ps(x, lo);
  const __m512 kf = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(kf, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fmadd_ps(kf, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ), _mm512_scalef_ps(p, kf));
}

// One LM head: W [V, d] bf16 as the A operand of the logit tiles (32 rows of Kp columns, stride Kp), and
// optionally W^T [Kp, Vp] as the A operand of dh^T. Rows and columns past V and d read as zeros.
struct Head {
  const uint16_t* w;
  const float* bias;  // [V] or null
  int64_t V, d, Kp, Vp;
  Buffer<uint16_t> padded;      // [Vp, Kp] when d is not a multiple of 32
  Buffer<uint16_t> tail;        // the last, partial 32-row block [32, Kp]

  Head(const uint16_t* w_, const float* b, int64_t V_, int64_t d_) : w(w_), bias(b), V(V_), d(d_) {
    Kp = round_up(d, kTile);
    Vp = round_up(V, kTile);
    if (Kp != d) {
      padded = zeroed<uint16_t>(Vp * Kp);
      for (int64_t v = 0; v < V; ++v) std::memcpy(padded.get() + v * Kp, w + v * d, d * 2);
    } else if (Vp != V) {
      tail = zeroed<uint16_t>(kTile * Kp);
      const int64_t v0 = Vp - kTile;
      std::memcpy(tail.get(), w + v0 * d, (V - v0) * d * 2);
    }
  }

  const uint16_t* rows(int64_t v0) const {  // 32 rows from v0 (a multiple of 32), stride Kp
    if (padded) return padded.get() + v0 * Kp;
    if (tail && v0 + kTile > V) return tail.get();
    return w + v0 * Kp;
  }

  // W[v0 : v0 + rows]^T into t [Kp, rows] (zeros past V and d): the A operand of dh^T for one vocabulary
  // block, built per block in the thread that uses it (hot in L2; no [d, V] copy of the head, and a
  // 512-byte row stride where a full W^T would put every tile row on a different page).
  void transpose_block(int64_t v0, int64_t rows, uint16_t* t) const {
    std::memset(t, 0, Kp * rows * sizeof(uint16_t));
    const int64_t nv = std::min(rows, V - v0);
    for (int64_t c0 = 0; c0 < d; c0 += 32)
      for (int64_t v = 0; v < nv; ++v) {
        const uint16_t* src = w + (v0 + v) * d;
        for (int64_t c = c0; c < std::min(c0 + 32, d); ++c) t[c * rows + v] = src[c];
      }
  }

  float bias_at(int64_t v) const { return bias ? bias[v] : 0.f; }
};

// r[0..16) (rows of 16 32-bit words) transposed in registers: r[i] lane j becomes r[j] lane i.
CAI_AMX inline void transpose16(__m512i r[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 16; i += 2) {  // 32-bit interleave of row pairs
    a[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    a[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // b[g + c], 128-bit lane L: column 4 L + c of rows g..g+3
    b[g] = _mm512_unpacklo_epi64(a[g], a[g + 2]);
    b[g + 1] = _mm512_unpackhi_epi64(a[g], a[g + 2]);
    b[g + 2] = _mm512_unpacklo_epi64(a[g + 1], a[g + 3]);
    b[g + 3] = _mm512_unpackhi_epi64(a[g + 1], a[g + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // 4 x 4 transpose of 128-bit lanes: column 4 L + c gathers lane L of each group
    const __m512i y0 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0x44), y1 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0xEE);
    const __m512i y2 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0x44);
    const __m512i y3 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0xEE);
    r[c] = _mm512_shuffle_i32x4(y0, y2, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(y0, y2, 0xDD);
    r[8 + c] = _mm512_shuffle_i32x4(y1, y3, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(y1, y3, 0xDD);
  }
}

// Tokens [n0, n0 + 16) of h (rows `stride` elements apart; tokens past N as zeros) into their block of the B operand
// layout below ([Np/16][Kp/2][16] pairs), d a multiple of 32: per 16 pairs, one register transpose of 32-bit pairs.
CAI_AMX inline void pack_block_by_k(const uint16_t* h, int64_t stride, int64_t n0, int64_t N, int64_t d, int64_t Kp,
                                    uint32_t* out) {
  for (int64_t k0 = 0; k0 < d; k0 += 32) {
    __m512i r[16];
    for (int64_t i = 0; i < 16; ++i)
      r[i] = n0 + i < N ? _mm512_loadu_si512(h + (n0 + i) * stride + k0) : _mm512_setzero_si512();
    transpose16(r);
    uint32_t* dst = out + (n0 / 16) * (Kp / 2) * 16 + (k0 / 2) * 16;
    for (int64_t j = 0; j < 16; ++j) _mm512_storeu_si512(dst + j * 16, r[j]);
  }
}

// Hidden states as B operands: by 16-token blocks with K pairs as rows ([Np/16][Kp/2][16] pairs) for the
// logit tiles (and the linear layers): per 16 tokens x 16 pairs, one register transpose of their 32-bit pairs.
CAI_AMX inline Buffer<uint32_t> pack_tokens_by_k(const uint16_t* h, int64_t N, int64_t d, int64_t Np, int64_t Kp) {
  auto out = zeroed<uint32_t>(Np * Kp / 2);
  if (d % 32) {  // pairs straddle the 16-pair blocks: element by element
    uint16_t* o = reinterpret_cast<uint16_t*>(out.get());
#pragma omp parallel for schedule(static) if (N > 256)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < d; ++k) o[((n / 16) * (Kp / 2) * 16 + (k / 2) * 16 + n % 16) * 2 + k % 2] = h[n * d + k];
    return out;
  }
#pragma omp parallel for schedule(static) if (N > 256)
  for (int64_t n0 = 0; n0 < N; n0 += 16) pack_block_by_k(h, d, n0, N, d, Kp, out.get());
  return out;
}

// zT[v, n] = W[v] . h[n] for 32-row blocks v in [v0, v0 + nv) and tokens [n0, n0 + nn) (multiples of 32), into z (row stride ldz)
CAI_AMX inline void weight_tiles(const Head& head, const uint32_t* hk, int64_t v0, int64_t nv, int64_t n0, int64_t nn,
                         float* z, int64_t ldz) {
  const int64_t kp = head.Kp;
  for (int64_t vi = 0; vi < nv; vi += kTile) {
    const uint16_t* a = head.rows(v0 + vi);
    for (int64_t ni = 0; ni < nn; ni += kTile)
      tile_2x2(a, kp * 2, 64, hk + (n0 + ni) / 16 * (kp / 2) * 16, kp * 32, 64, 1024, kp / kTile,
               z + vi * ldz + ni, ldz * 4, false);
  }
}

}  // namespace bf16_tiles
