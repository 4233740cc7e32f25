#pragma once
// Branch-free float math that the compiler vectorises (no libm calls inside the hot loops).
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define CAI_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CAI_MULTIVERSION
#endif

// exp(x) for x <= 0 (every caller subtracts the row max first): Cody-Waite range reduction and a
// degree-6 polynomial, about 2 ulp; inputs below -87 (where float exp underflows) give exactly 0.
static inline float exp_nonpositive(float x) {
  const float lo = -87.0f;
  const float xc = x < lo ? lo : x;
  // round to nearest by the 1.5 * 2^23 trick: plain adds vectorise everywhere, floorf does not
  const float kf = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (xc - kf * 0.693359375f) + kf * 2.12194440e-4f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(kf) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < lo ? 0.0f : p * scale;
}

// log(1 + e) for e in [0, 1]: 2 atanh(e / (2 + e)) by its odd series (|s| <= 1/3, error < 1e-7),
// exact for small e where forming 1 + e would round.
static inline float log1p_unit(float e) {
  const float s = e / (2.0f + e), s2 = s * s;
  float p = 1.0f / 13.0f;
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p;
}

// bfloat16 <-> float by bit patterns (numpy has no bfloat16: bf16 buffers arrive as 16-bit integers).
static inline float bf16_to_float(uint16_t x) {
  const uint32_t bits = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

static inline uint16_t float_to_bf16(float f) {  // round to nearest even, NaN kept NaN
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  const uint16_t nan = uint16_t((bits >> 16) | 0x40);
  const uint16_t rounded = uint16_t((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
  return (bits & 0x7fffffff) > 0x7f800000 ? nan : rounded;
}

// sigmoid(x) for any float: through exp(-|x|) so that nothing overflows.
static inline float sigmoid(float x) {
  const float e = exp_nonpositive(x > 0 ? -x : x);
  return (x >= 0 ? 1.0f : e) / (1.0f + e);
}

// n values from a float32 or bfloat16 buffer (from element `offset`) into float scratch, and back: the kernels
// that take either storage work on float rows in between.
static inline void load_floats(const void* src, bool bf16, int64_t offset, int64_t n, float* dst) {
  if (bf16) {
    const uint16_t* s = static_cast<const uint16_t*>(src) + offset;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(s[i]);
  } else {
    std::memcpy(dst, static_cast<const float*>(src) + offset, n * sizeof(float));
  }
}

static inline void store_floats(const float* src, int64_t n, void* dst, bool bf16, int64_t offset) {
  if (bf16) {
    uint16_t* d = static_cast<uint16_t*>(dst) + offset;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) d[i] = float_to_bf16(src[i]);
  } else {
    std::memcpy(static_cast<float*>(dst) + offset, src, n * sizeof(float));
  }
}
