// Stands in for the CUDA code in builds without nvcc: reports that clearly.
#include <stdexcept>

#include "cuda/cuda_api.h"

namespace cachedattn::cuda {

namespace {
[[noreturn]] void not_built() {
  throw std::runtime_error(
      "cachedattn was built without CUDA (no nvcc at build time, or CACHEDATTN_CUDA=OFF); rebuild with nvcc on PATH");
}
}  // namespace

bool built() { return false; }

int device_count(std::string* reason) {
  if (reason) *reason = "cachedattn was built without CUDA";
  return 0;
}

void host_register(void*, size_t) { not_built(); }
void host_unregister(void*) noexcept {}

struct CopyEngine::Impl {};
CopyEngine::CopyEngine(int, int) { not_built(); }
CopyEngine::~CopyEngine() = default;
int CopyEngine::device() const { not_built(); }
int CopyEngine::num_layers() const { not_built(); }
uintptr_t CopyEngine::stream(Direction) const { not_built(); }
void CopyEngine::copy_batch(Direction, const std::vector<Segment>&, int, int64_t) { not_built(); }
void CopyEngine::copy_2d(Direction, uintptr_t, size_t, uintptr_t, size_t, size_t, size_t, int, int64_t) { not_built(); }
void CopyEngine::segment_copy(Direction, const std::vector<Segment>&, int, int64_t) { not_built(); }
void CopyEngine::rope_copy(const RopeArgs&, int, int64_t) { not_built(); }
int64_t CopyEngine::begin_epoch() { not_built(); }
void CopyEngine::end_epoch(int64_t) { not_built(); }
void CopyEngine::stream_wait_layer(Direction, int, uintptr_t, int64_t) { not_built(); }
void CopyEngine::wait_layer(Direction, int, int64_t) { not_built(); }
void CopyEngine::wait_for_stream(Direction, uintptr_t) { not_built(); }
bool CopyEngine::layer_done(Direction, int, int64_t) const { not_built(); }
int64_t CopyEngine::record(Direction) { not_built(); }
bool CopyEngine::ticket_done(int64_t) { not_built(); }
void CopyEngine::wait_ticket(int64_t) { not_built(); }
void CopyEngine::synchronize(Direction) { not_built(); }

}  // namespace cachedattn::cuda
