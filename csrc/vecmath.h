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
