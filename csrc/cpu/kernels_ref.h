// CPU references of the CUDA kernels. The CPU path runs them, and the tests
// hold both the torch formulas and the CUDA kernels against them.
#pragma once
#include <vector>

#include "common/kernel_args.h"

namespace cachedattn::cpu {

// Copies each segment; segments must not overlap.
void segment_copy(const std::vector<Segment>& segments);

// out = x * cos + rotate(x) * sin on the rotary dims, copy on the rest.
void rope_rotate(const RopeArgs& args);

}  // namespace cachedattn::cpu
