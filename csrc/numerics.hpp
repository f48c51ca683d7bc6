// Scalar float conversions, bit-exact with torch (c10::BFloat16, c10::detail fp16 helpers).
// Branch-free so that GCC vectorises the loops that use them. Requires -ffp-contract=off and no
// -ffast-math (the f16 rounding relies on exact IEEE float arithmetic).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace lsf {

inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bf16_to_f32(uint16_t h) { return f32_from_bits(static_cast<uint32_t>(h) << 16); }

// c10::detail::fp16_ieee_to_fp32_value: exact, including subnormals, infinities and NaN.
inline float f16_to_f32(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & UINT32_C(0x80000000);
  const uint32_t two_w = w + w;
  const uint32_t exp_offset = UINT32_C(0xE0) << 23;
  const float exp_scale = f32_from_bits(UINT32_C(0x7800000));  // 0x1.0p-112f
  const float normalized_value = f32_from_bits((two_w >> 4) + exp_offset) * exp_scale;
  const uint32_t magic_mask = UINT32_C(126) << 23;
  const float magic_bias = 0.5f;
  const float denormalized_value = f32_from_bits((two_w >> 17) | magic_mask) - magic_bias;
  const uint32_t denormalized_cutoff = UINT32_C(1) << 27;
  // Branch-free select (a ?: would become a branch around trapping float math and block
  // vectorisation).
  const uint32_t denorm_mask = UINT32_C(0) - static_cast<uint32_t>(two_w < denormalized_cutoff);
  const uint32_t result = sign | (f32_to_bits(denormalized_value) & denorm_mask) |
                          (f32_to_bits(normalized_value) & ~denorm_mask);
  return f32_from_bits(result);
}

// c10::BFloat16 round_to_nearest_even: NaN -> 0x7FC0.
inline uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_to_bits(f);
  const uint32_t rounded = (u + UINT32_C(0x7FFF) + ((u >> 16) & 1)) >> 16;
  return static_cast<uint16_t>(f != f ? UINT32_C(0x7FC0) : rounded);
}

// c10::detail::fp16_ieee_from_fp32_value: round to nearest even, overflow -> inf, subnormals
// exact, NaN -> sign | 0x7E00.
inline uint16_t f32_to_f16(float f) {
  const float scale_to_inf = f32_from_bits(UINT32_C(239) << 23);  // 0x1.0p+112f
  const float scale_to_zero = f32_from_bits(UINT32_C(17) << 23);  // 0x1.0p-110f
  float base = (std::fabs(f) * scale_to_inf) * scale_to_zero;

  const uint32_t w = f32_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & UINT32_C(0x80000000);
  uint32_t bias = shl1_w & UINT32_C(0xFF000000);
  bias = bias < UINT32_C(0x71000000) ? UINT32_C(0x71000000) : bias;

  base = f32_from_bits((bias >> 1) + UINT32_C(0x07800000)) + base;
  const uint32_t bits = f32_to_bits(base);
  const uint32_t exp_bits = (bits >> 13) & UINT32_C(0x00007C00);
  const uint32_t mantissa_bits = bits & UINT32_C(0x00000FFF);
  const uint32_t nonsign = exp_bits + mantissa_bits;
  const uint32_t nan_mask = UINT32_C(0) - static_cast<uint32_t>(shl1_w > UINT32_C(0xFF000000));
  return static_cast<uint16_t>((sign >> 16) | (UINT32_C(0x7E00) & nan_mask) |
                               (nonsign & ~nan_mask));
}

}  // namespace lsf
