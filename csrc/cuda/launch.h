// Launchers: size the grid, pass raw device-visible pointers, check the launch.
#pragma once
#include <cuda_runtime.h>

#include <vector>

#include "common/kernel_args.h"

namespace cachedattn::cuda {

// Pointers must already be valid on the device (see runtime.cu's aliasing).
void launch_segment_copy(const std::vector<Segment>& segments, cudaStream_t stream);
void launch_rope_rotate(const RopeArgs& args, cudaStream_t stream);

// A device-visible address for [ptr, ptr + bytes): device memory as is,
// registered host memory through its mapping. Throws for pageable memory,
// which a kernel cannot touch.
uintptr_t device_visible(uintptr_t ptr, size_t bytes);

// Throws std::invalid_argument naming the pointer when [ptr, ptr + bytes) is
// pageable host memory: cudaMemcpyAsync would silently stage and block.
void require_dma_capable(uintptr_t ptr, size_t bytes);

// Remembers that a copy engine runs on `device`, so host_unregister knows
// which devices may still be copying out of a region.
void note_device_used(int device);

}  // namespace cachedattn::cuda
