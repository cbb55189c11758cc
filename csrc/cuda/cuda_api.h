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
// Waits for every device a copy engine ran on to go idle, then unpins.
void host_unregister(void* ptr) noexcept;

enum class Direction { HostToDevice = 0, DeviceToHost = 1 };

// Dedicated H2D and D2H streams with one event per layer, so compute waits on
// exactly the layer it needs and never on the host. Layer events belong to an
// epoch (one per load or turn): several epochs may be open at once (the
// running turn's and the read buffer's), each with its own layer events, and a
// wait on a layer not issued in the epoch it names throws instead of binding
// to another load's copy. `epoch` -1 names the most recently begun one.
// Thread-safe.
class CopyEngine {
 public:
  CopyEngine(int device, int num_layers);
  ~CopyEngine();
  CopyEngine(const CopyEngine&) = delete;
  CopyEngine& operator=(const CopyEngine&) = delete;

  int device() const;
  int num_layers() const;
  uintptr_t stream(Direction dir) const;

  // Opens a new epoch and returns its number (an engine starts with epoch 0
  // open). Other open epochs keep their events.
  int64_t begin_epoch();
  // Forgets an epoch's layer events (waiting on them afterwards throws).
  void end_epoch(int64_t epoch);

  // cudaMemcpyAsync for each triple on the direction's stream; then, when
  // layer >= 0, records that layer's event of `epoch` for the direction.
  // Pageable host pointers throw std::invalid_argument (the copy would be synchronous).
  void copy_batch(Direction dir, const std::vector<Segment>& copies, int layer, int64_t epoch = -1);
  // One cudaMemcpy2DAsync: `height` rows of `width` bytes, rows `src_pitch` /
  // `dst_pitch` bytes apart (e.g. every head's tokens of one chunk in one call).
  void copy_2d(Direction dir, uintptr_t src, size_t src_pitch, uintptr_t dst, size_t dst_pitch, size_t width,
               size_t height, int layer, int64_t epoch = -1);
  // The same in one kernel launch per 1024 segments (mapped pinned memory).
  void segment_copy(Direction dir, const std::vector<Segment>& copies, int layer, int64_t epoch = -1);
  // Rotates keys by a position delta on the H2D stream; src == dst allowed.
  // Fastest in device memory: mapped host memory is read over PCIe in 2-byte loads.
  void rope_copy(const RopeArgs& args, int layer, int64_t epoch = -1);

  // Makes `stream` wait for the layer's copies of `epoch` (no host sync).
  void stream_wait_layer(Direction dir, int layer, uintptr_t stream, int64_t epoch = -1);
  // Blocks the calling thread until the layer's copies of `epoch` are done.
  void wait_layer(Direction dir, int layer, int64_t epoch = -1);
  // Makes the direction's stream wait for work already queued on `stream`.
  void wait_for_stream(Direction dir, uintptr_t stream);
  bool layer_done(Direction dir, int layer, int64_t epoch = -1) const;

  // A ticket marks every copy issued so far in a direction. It is released
  // (its event back to the pool) once ticket_done returned true or
  // wait_ticket returned; a released or unknown ticket throws invalid_argument.
  int64_t record(Direction dir);
  bool ticket_done(int64_t ticket);
  void wait_ticket(int64_t ticket);  // blocks the calling thread

  void synchronize(Direction dir);  // blocks the calling thread

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace cachedattn::cuda
