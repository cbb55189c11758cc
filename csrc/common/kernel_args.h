// Arguments shared by the CUDA kernels and their CPU references.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/dtype.h"

namespace cachedattn {

struct Segment {
  uintptr_t src;
  uintptr_t dst;
  size_t bytes;
};

// Re-rotation of post-RoPE keys by a position delta.
struct RopeArgs {
  uintptr_t src;    // [rows, head_dim], rows = batch * heads * tokens
  uintptr_t dst;    // same layout; may equal src
  size_t rows;
  int head_dim;
  int rotary_dim;   // leading dims that rotate; the rest are copied unchanged
  bool interleaved; // pairs (2i, 2i+1) (gptj, cohere, glm) instead of (i, i + rotary_dim/2)
  DType dtype;
  std::vector<float> cos_sin;  // rotary_dim/2 cosines, then rotary_dim/2 sines
};

constexpr int kMaxRotaryDim = 512;

// cos/sin of delta * inv_freq[i]. The angle is formed in double: a float
// product loses whole radians once delta * inv_freq passes ~1e4.
inline std::vector<float> rope_cos_sin(double delta, const float* inv_freq, int half) {
  std::vector<float> cs(2 * static_cast<size_t>(half));
  for (int i = 0; i < half; ++i) {
    double a = delta * static_cast<double>(inv_freq[i]);
    cs[i] = static_cast<float>(std::cos(a));
    cs[half + i] = static_cast<float>(std::sin(a));
  }
  return cs;
}

inline void check_rope_args(const RopeArgs& a) {
  if (a.head_dim <= 0 || a.rotary_dim <= 0 || a.rotary_dim > a.head_dim || a.rotary_dim % 2 != 0 ||
      a.rotary_dim > kMaxRotaryDim)
    throw std::invalid_argument("rotary_dim must be even, positive, at most head_dim and at most " +
                                std::to_string(kMaxRotaryDim) + " (rotary_dim=" + std::to_string(a.rotary_dim) +
                                ", head_dim=" + std::to_string(a.head_dim) + ")");
  if (a.cos_sin.size() != static_cast<size_t>(a.rotary_dim))
    throw std::invalid_argument("cos/sin table has " + std::to_string(a.cos_sin.size()) + " entries, expected " +
                                std::to_string(a.rotary_dim));
  if (a.rows > 0 && (a.src == 0 || a.dst == 0)) throw std::invalid_argument("null key pointer");
}

}  // namespace cachedattn
