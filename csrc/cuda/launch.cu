#include <algorithm>

#include "cuda/check.cuh"
#include "cuda/kernels.cuh"
#include "cuda/launch.h"

namespace cachedattn::cuda {

void launch_segment_copy(const std::vector<Segment>& segments, cudaStream_t stream) {
  for (size_t first = 0; first < segments.size(); first += kMaxSegments) {
    SegmentTable table{};
    size_t n = std::min<size_t>(kMaxSegments, segments.size() - first);
    uint64_t longest = 0;
    for (size_t i = 0; i < n; ++i) {
      const Segment& s = segments[first + i];
      table.src[i] = s.src;
      table.dst[i] = s.dst;
      table.bytes[i] = s.bytes;
      longest = std::max<uint64_t>(longest, s.bytes);
    }
    table.n = static_cast<int>(n);
    if (longest == 0) continue;
    // About 64 KiB per block per pass: enough blocks to fill the copy, few enough to start fast.
    unsigned bx = static_cast<unsigned>(std::min<uint64_t>(1024, (longest + 65535) / 65536));
    segment_copy_kernel<<<dim3(bx, static_cast<unsigned>(n)), 256, 0, stream>>>(table);
    CA_CUDA_CHECK_LAUNCH("segment_copy_kernel");
  }
}

void launch_rope_rotate(const RopeArgs& a, cudaStream_t stream) {
  check_rope_args(a);
  if (a.rows == 0) return;
  CosSinTable cs{};
  std::copy(a.cos_sin.begin(), a.cos_sin.end(), cs.v);
  const uint64_t per_row = a.rotary_dim / 2 + (a.head_dim - a.rotary_dim);
  const uint64_t total = a.rows * per_row;
  const unsigned blocks = static_cast<unsigned>(std::min<uint64_t>(8192, (total + 255) / 256));
  switch (a.dtype) {
    case DType::F32:
      rope_rotate_kernel<float><<<blocks, 256, 0, stream>>>(reinterpret_cast<const float*>(a.src),
                                                            reinterpret_cast<float*>(a.dst), a.rows, a.head_dim,
                                                            a.rotary_dim, a.interleaved, cs);
      break;
    case DType::F16:
      rope_rotate_kernel<__half><<<blocks, 256, 0, stream>>>(reinterpret_cast<const __half*>(a.src),
                                                             reinterpret_cast<__half*>(a.dst), a.rows, a.head_dim,
                                                             a.rotary_dim, a.interleaved, cs);
      break;
    case DType::BF16:
      rope_rotate_kernel<__nv_bfloat16><<<blocks, 256, 0, stream>>>(
          reinterpret_cast<const __nv_bfloat16*>(a.src), reinterpret_cast<__nv_bfloat16*>(a.dst), a.rows,
          a.head_dim, a.rotary_dim, a.interleaved, cs);
      break;
  }
  CA_CUDA_CHECK_LAUNCH("rope_rotate_kernel");
}

}  // namespace cachedattn::cuda
