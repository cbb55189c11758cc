// Every CUDA call and launch is checked; failures become C++ exceptions that
// the bindings turn into RuntimeError with CUDA's own message.
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace cachedattn::cuda {

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorName(err) + " (" +
                             cudaGetErrorString(err) + ")");
}

}  // namespace cachedattn::cuda

#define CA_CUDA_CHECK(call) ::cachedattn::cuda::check((call), #call)
#define CA_CUDA_CHECK_LAUNCH(name) ::cachedattn::cuda::check(cudaGetLastError(), name " launch")
