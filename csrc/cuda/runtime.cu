#include <cstdio>
#include <mutex>
#include <set>
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
std::set<int> g_devices;  // devices copy engines ran on

std::string hex(uintptr_t p) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(p));
  return buf;
}

bool in_registered_range(uintptr_t ptr, size_t bytes, uintptr_t* device) {
  std::lock_guard<std::mutex> lock(g_mu);
  for (const Mapping& m : g_mappings)
    if (ptr >= m.host && ptr + bytes <= m.host + m.bytes) {
      if (device) *device = m.device + (ptr - m.host);
      return true;
    }
  return false;
}

cudaPointerAttributes attributes(uintptr_t ptr) {
  cudaPointerAttributes attr{};
  cudaError_t err = cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptr));
  if (err != cudaSuccess) {
    cudaGetLastError();
    attr.type = cudaMemoryTypeUnregistered;
  }
  return attr;
}

[[noreturn]] void refuse_pageable(uintptr_t ptr, size_t bytes, const char* needs) {
  throw std::invalid_argument("pointer " + hex(ptr) + " (" + std::to_string(bytes) +
                              " bytes) is pageable host memory: " + needs +
                              " (a HostPool block or a pin_memory() tensor)");
}

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

void note_device_used(int device) {
  std::lock_guard<std::mutex> lock(g_mu);
  g_devices.insert(device);
}

void host_unregister(void* ptr) noexcept {
  // cudaHostUnregister does not wait for copies still queued on a stream (the
  // runtime documents no such ordering): unpinning under an in-flight DMA lets
  // the engine read or write pages the kernel may already have reused. So every
  // device that ran a copy engine, and the caller's current one (torch's own
  // non_blocking copies from pool views), goes idle first. Regions are torn
  // down rarely (pool close), so a whole-device sync is an acceptable price.
  std::set<int> devices;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    devices = g_devices;
  }
  int prev = -1;
  if (cudaGetDevice(&prev) == cudaSuccess) devices.insert(prev);
  for (int d : devices)
    if (cudaSetDevice(d) == cudaSuccess) cudaDeviceSynchronize();  // errors: nothing more to wait for
  if (prev >= 0) cudaSetDevice(prev);
  cudaGetLastError();
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
  uintptr_t dev = 0;
  if (in_registered_range(ptr, bytes, &dev)) return dev;
  cudaPointerAttributes attr = attributes(ptr);
  switch (attr.type) {
    case cudaMemoryTypeDevice:
    case cudaMemoryTypeManaged:
      return ptr;
    case cudaMemoryTypeHost:
      if (attr.devicePointer != nullptr) return reinterpret_cast<uintptr_t>(attr.devicePointer);
      [[fallthrough]];
    default:
      refuse_pageable(ptr, bytes, "kernels need device memory or pinned host memory registered with CUDA");
  }
}

void require_dma_capable(uintptr_t ptr, size_t bytes) {
  if (in_registered_range(ptr, bytes, nullptr)) return;  // pool memory: no driver call
  switch (attributes(ptr).type) {
    case cudaMemoryTypeDevice:
    case cudaMemoryTypeManaged:
      return;  // a range past the allocation is the copy's own error
    case cudaMemoryTypeHost:
      // Pinned at the start; pageable past the pinned allocation's end is refused too.
      if (bytes <= 1 || attributes(ptr + bytes - 1).type != cudaMemoryTypeUnregistered) return;
      [[fallthrough]];
    default:
      refuse_pageable(ptr, bytes, "asynchronous copies need device memory or page-locked host memory");
  }
}

}  // namespace cachedattn::cuda
