// Element types the kernels accept, and the float conversions the CPU
// references need (no compiler extension types, so any host compiler works).
#pragma once
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace cachedattn {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

inline DType dtype_from_int(int code) {
  if (code < 0 || code > 2) throw std::invalid_argument("unsupported dtype code " + std::to_string(code) +
                                                        " (0=float32, 1=float16, 2=bfloat16)");
  return static_cast<DType>(code);
}

inline size_t dtype_size(DType t) { return t == DType::F32 ? 4 : 2; }

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// Round to nearest even, NaN kept quiet: the same rounding torch and CUDA use.
inline uint16_t float_to_bf16(float f) {
  uint32_t b = float_to_bits(f);
  if ((b & 0x7f800000u) == 0x7f800000u && (b & 0x007fffffu)) return static_cast<uint16_t>((b >> 16) | 0x40);
  b += 0x7fffu + ((b >> 16) & 1u);
  return static_cast<uint16_t>(b >> 16);
}

inline float f16_to_float(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t man = h & 0x3ff;
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);
    // Subnormal: value = man * 2^-24.
    float v = static_cast<float>(man) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (man << 13));
  return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}

inline uint16_t float_to_f16(float f) {
  uint32_t b = float_to_bits(f);
  uint16_t sign = static_cast<uint16_t>((b >> 16) & 0x8000u);
  uint32_t absb = b & 0x7fffffffu;
  if (absb >= 0x7f800000u) return sign | 0x7c00u | (absb > 0x7f800000u ? 0x200u : 0u);
  if (absb >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: overflow to inf
  if (absb < 0x38800000u) {
    // Result is subnormal or zero: scale into units of 2^-24 and round to nearest even.
    float a = bits_to_float(absb) * 16777216.0f;
    uint32_t q = static_cast<uint32_t>(a);
    float rem = a - static_cast<float>(q);
    if (rem > 0.5f || (rem == 0.5f && (q & 1u))) ++q;
    return sign | static_cast<uint16_t>(q);
  }
  uint32_t mant = absb & 0x7fffffu;
  uint32_t exp = (absb >> 23) - 112;
  uint32_t h = (exp << 10) | (mant >> 13);
  uint32_t rest = mant & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // may carry into the exponent: still right
  return sign | static_cast<uint16_t>(h);
}

}  // namespace cachedattn
