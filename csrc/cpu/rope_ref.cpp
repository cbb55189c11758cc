#include <cstdint>

#include "cpu/kernels_ref.h"

namespace cachedattn::cpu {

namespace {

struct F32 {
  using T = float;
  static float load(T v) { return v; }
  static T store(float v) { return v; }
};
struct F16 {
  using T = uint16_t;
  static float load(T v) { return f16_to_float(v); }
  static T store(float v) { return float_to_f16(v); }
};
struct BF16 {
  using T = uint16_t;
  static float load(T v) { return bf16_to_float(v); }
  static T store(float v) { return float_to_bf16(v); }
};

template <class E>
void rotate(const RopeArgs& a) {
  using T = typename E::T;
  const int half = a.rotary_dim / 2;
  const float* cs = a.cos_sin.data();
  const T* src = reinterpret_cast<const T*>(a.src);
  T* dst = reinterpret_cast<T*>(a.dst);
  for (size_t r = 0; r < a.rows; ++r) {
    const T* x = src + r * a.head_dim;
    T* y = dst + r * a.head_dim;
    for (int i = 0; i < half; ++i) {
      int i0 = a.interleaved ? 2 * i : i;
      int i1 = a.interleaved ? 2 * i + 1 : i + half;
      float x0 = E::load(x[i0]), x1 = E::load(x[i1]);
      float c = cs[i], s = cs[half + i];
      y[i0] = E::store(x0 * c - x1 * s);
      y[i1] = E::store(x1 * c + x0 * s);
    }
    if (y != x)
      for (int d = a.rotary_dim; d < a.head_dim; ++d) y[d] = x[d];
  }
}

}  // namespace

void rope_rotate(const RopeArgs& a) {
  check_rope_args(a);
  switch (a.dtype) {
    case DType::F32: return rotate<F32>(a);
    case DType::F16: return rotate<F16>(a);
    case DType::BF16: return rotate<BF16>(a);
  }
}

}  // namespace cachedattn::cpu
