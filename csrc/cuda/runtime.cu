#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/check.cuh"
#include "cuda/cuda_api.h"
#include "cuda/launch.h"

namespace cachedattn::cuda {

namespace {

struct Mapping {
  uintptr_t host;
  size_t bytes;
  uintptr_t device;
};

// Ranges this library registered: resolving a pool pointer is a short scan,
// not a driver call per segment.
std::mutex g_mu;
std::vector<Mapping> g_mappings;

}  // namespace

bool built() { return true; }

int device_count(std::string* reason) {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    // No driver, no device, or a driver older than this runtime: no GPU for us.
    if (reason) *reason = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
    cudaGetLastError();
    return 0;
  }
  if (n == 0 && reason) *reason = "no CUDA device found";
  return n;
}

void host_register(void* ptr, size_t bytes) {
  // Mapped: kernels read it zero-copy. Portable: every context sees it pinned.
  CA_CUDA_CHECK(cudaHostRegister(ptr, bytes, cudaHostRegisterMapped | cudaHostRegisterPortable));
  void* dev = nullptr;
  cudaError_t err = cudaHostGetDevicePointer(&dev, ptr, 0);
  if (err != cudaSuccess) {
    cudaHostUnregister(ptr);
    check(err, "cudaHostGetDevicePointer");
  }
  std::lock_guard<std::mutex> lock(g_mu);
  g_mappings.push_back({reinterpret_cast<uintptr_t>(ptr), bytes, reinterpret_cast<uintptr_t>(dev)});
}

void host_unregister(void* ptr) noexcept {
  {
    std::lock_guard<std::mutex> lock(g_mu);
    for (size_t i = 0; i < g_mappings.size(); ++i)
      if (g_mappings[i].host == reinterpret_cast<uintptr_t>(ptr)) {
        g_mappings.erase(g_mappings.begin() + static_cast<long>(i));
        break;
      }
  }
  if (cudaHostUnregister(ptr) != cudaSuccess) cudaGetLastError();
}

uintptr_t device_visible(uintptr_t ptr, size_t bytes) {
  {
    std::lock_guard<std::mutex> lock(g_mu);
    for (const Mapping& m : g_mappings)
      if (ptr >= m.host && ptr + bytes <= m.host + m.bytes) return m.device + (ptr - m.host);
  }
  cudaPointerAttributes attr{};
  cudaError_t err = cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptr));
  if (err != cudaSuccess) {
    cudaGetLastError();
    attr.type = cudaMemoryTypeUnregistered;
  }
  switch (attr.type) {
    case cudaMemoryTypeDevice:
    case cudaMemoryTypeManaged:
      return ptr;
    case cudaMemoryTypeHost:
      if (attr.devicePointer != nullptr) return reinterpret_cast<uintptr_t>(attr.devicePointer);
      [[fallthrough]];
    default:
      throw std::invalid_argument(
          "pointer is pageable host memory: kernels need device memory or pinned host memory registered with CUDA "
          "(a HostPool block or a pin_memory() tensor)");
  }
}

}  // namespace cachedattn::cuda
