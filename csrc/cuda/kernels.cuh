// Device code only: the kernels. launch.cu sizes and launches them.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/kernel_args.h"

namespace cachedattn::cuda {

// Passed by value: kernel parameters up to 32 KiB need CUDA 12.1+ and sm_70+,
// which every target of this build (sm_80, sm_90) meets. No device-side table
// to allocate, fill and fence per call.
constexpr int kMaxSegments = 1024;
struct SegmentTable {
  int n;
  uint64_t src[kMaxSegments];
  uint64_t dst[kMaxSegments];
  uint64_t bytes[kMaxSegments];
};
static_assert(sizeof(SegmentTable) < 32764, "kernel parameter limit");

// blockIdx.y picks the segment; blocks along x stride over its bytes, 16 at a
// time when both ends are 16-byte aligned (PCIe and HBM both want wide loads).
__global__ void segment_copy_kernel(const SegmentTable table) {
  const int s = blockIdx.y;
  if (s >= table.n) return;
  const char* src = reinterpret_cast<const char*>(table.src[s]);
  char* dst = reinterpret_cast<char*>(table.dst[s]);
  const uint64_t n = table.bytes[s];
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  const uint64_t tid = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  uint64_t head = 0;
  if (((table.src[s] | table.dst[s]) & 15u) == 0) {
    const uint64_t vecs = n / 16;
    const uint4* s4 = reinterpret_cast<const uint4*>(src);
    uint4* d4 = reinterpret_cast<uint4*>(dst);
    for (uint64_t i = tid; i < vecs; i += stride) d4[i] = s4[i];
    head = vecs * 16;
  }
  for (uint64_t i = head + tid; i < n; i += stride) dst[i] = src[i];
}

template <typename T>
struct Elem;
template <>
struct Elem<float> {
  __device__ static float load(float v) { return v; }
  __device__ static float store(float v) { return v; }
};
template <>
struct Elem<__half> {
  __device__ static float load(__half v) { return __half2float(v); }
  __device__ static __half store(float v) { return __float2half_rn(v); }
};
template <>
struct Elem<__nv_bfloat16> {
  __device__ static float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

struct CosSinTable {
  float v[kMaxRotaryDim];  // half cosines, then half sines
};

// One work item per rotated pair plus one per pass-through dim, per row.
// Each item reads all it needs before writing, so src == dst is safe; that is
// also why neither pointer is __restrict__ (in place they alias, and the
// compiler could then reorder a store before the other item's load).
// In place on device memory is the fast use; reading mapped host memory here
// crosses PCIe in 2-byte loads, so the wiring copies first, then rotates.
template <typename T>
__global__ void rope_rotate_kernel(const T* src, T* dst, uint64_t rows, int head_dim, int rotary_dim,
                                   bool interleaved, const CosSinTable cs) {
  const int half = rotary_dim / 2;
  const int per_row = half + (head_dim - rotary_dim);
  const uint64_t total = rows * static_cast<uint64_t>(per_row);
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  for (uint64_t w = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; w < total; w += stride) {
    const uint64_t row = w / per_row;
    const int k = static_cast<int>(w - row * per_row);
    const T* x = src + row * head_dim;
    T* y = dst + row * head_dim;
    if (k < half) {
      const int i0 = interleaved ? 2 * k : k;
      const int i1 = interleaved ? 2 * k + 1 : k + half;
      const float x0 = Elem<T>::load(x[i0]);
      const float x1 = Elem<T>::load(x[i1]);
      const float c = cs.v[k], s = cs.v[half + k];
      y[i0] = Elem<T>::store(x0 * c - x1 * s);
      y[i1] = Elem<T>::store(x1 * c + x0 * s);
    } else {
      const int d = rotary_dim + (k - half);
      y[d] = x[d];
    }
  }
}

}  // namespace cachedattn::cuda
