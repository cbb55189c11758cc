// The CUDA side of the core as seen by the rest of it: plain C++, no CUDA
// headers, so memory/, io/ and the bindings compile without the toolkit.
// runtime.cu and copy_engine.cu implement it; no_cuda.cpp stands in when
// the build has no CUDA and says so at runtime.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/kernel_args.h"

namespace cachedattn::cuda {

// Whether this build contains the CUDA code.
bool built();

// Usable GPUs right now; 0 with *reason set when there is no driver or device.
int device_count(std::string* reason);

// Page-locks and maps host memory for DMA and zero-copy kernel access.
// Throws std::runtime_error with CUDA's message on failure.
void host_register(void* ptr, size_t bytes);
void host_unregister(void* ptr) noexcept;

enum class Direction { HostToDevice = 0, DeviceToHost = 1 };

// Dedicated H2D and D2H streams with one event per layer, so compute waits on
// exactly the layer it needs and never on the host.
class CopyEngine {
 public:
  CopyEngine(int device, int num_layers);
  ~CopyEngine();
  CopyEngine(const CopyEngine&) = delete;
  CopyEngine& operator=(const CopyEngine&) = delete;

  int device() const;
  int num_layers() const;
  uintptr_t stream(Direction dir) const;

  // cudaMemcpyAsync for each triple on the direction's stream; then, when
  // layer >= 0, records that layer's event for the direction.
  void copy_batch(Direction dir, const std::vector<Segment>& copies, int layer);
  // The same in one kernel launch per 1024 segments (mapped pinned memory).
  void segment_copy(Direction dir, const std::vector<Segment>& copies, int layer);
  // Rotates keys by a position delta while moving them host -> device.
  void rope_copy(const RopeArgs& args, int layer);

  // Makes `stream` wait for the layer's last recorded copy (no host sync).
  void stream_wait_layer(Direction dir, int layer, uintptr_t stream);
  // Makes the direction's stream wait for work already queued on `stream`.
  void wait_for_stream(Direction dir, uintptr_t stream);
  bool layer_done(Direction dir, int layer) const;
  void synchronize(Direction dir);  // blocks the calling thread

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace cachedattn::cuda
