#include <stdexcept>
#include <string>

#include "cuda/check.cuh"
#include "cuda/cuda_api.h"
#include "cuda/launch.h"

namespace cachedattn::cuda {

namespace {

// The engine's device for the duration of a call; the caller's device after.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    CA_CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != device) CA_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() { cudaSetDevice(prev_); }

 private:
  int prev_ = 0;
};

cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace

struct CopyEngine::Impl {
  int device = 0;
  int layers = 0;
  cudaStream_t streams[2] = {nullptr, nullptr};
  std::vector<cudaEvent_t> events[2];
  cudaEvent_t fence[2] = {nullptr, nullptr};

  cudaStream_t stream(Direction d) const { return streams[static_cast<int>(d)]; }

  void check_layer(int layer) const {
    if (layer < -1 || layer >= layers)
      throw std::invalid_argument("layer " + std::to_string(layer) + " out of range for an engine of " +
                                  std::to_string(layers) + " layers");
  }

  void record(Direction d, int layer) {
    check_layer(layer);
    if (layer >= 0) CA_CUDA_CHECK(cudaEventRecord(events[static_cast<int>(d)][layer], stream(d)));
  }
};

CopyEngine::CopyEngine(int device, int num_layers) : impl_(std::make_unique<Impl>()) {
  int n = device_count(nullptr);
  if (device < 0 || device >= n)
    throw std::invalid_argument("CUDA device " + std::to_string(device) + " does not exist (" + std::to_string(n) +
                                " visible)");
  if (num_layers < 0) throw std::invalid_argument("num_layers must be >= 0");
  impl_->device = device;
  impl_->layers = num_layers;
  DeviceGuard g(device);
  for (int d = 0; d < 2; ++d) {
    // Non-blocking: copies must not serialise with the legacy default stream.
    CA_CUDA_CHECK(cudaStreamCreateWithFlags(&impl_->streams[d], cudaStreamNonBlocking));
    CA_CUDA_CHECK(cudaEventCreateWithFlags(&impl_->fence[d], cudaEventDisableTiming));
    impl_->events[d].resize(num_layers);
    for (auto& e : impl_->events[d]) CA_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  }
}

CopyEngine::~CopyEngine() {
  if (!impl_) return;
  cudaSetDevice(impl_->device);
  for (int d = 0; d < 2; ++d) {
    if (impl_->streams[d]) cudaStreamSynchronize(impl_->streams[d]);
    for (auto e : impl_->events[d])
      if (e) cudaEventDestroy(e);
    if (impl_->fence[d]) cudaEventDestroy(impl_->fence[d]);
    if (impl_->streams[d]) cudaStreamDestroy(impl_->streams[d]);
  }
  cudaGetLastError();
}

int CopyEngine::device() const { return impl_->device; }
int CopyEngine::num_layers() const { return impl_->layers; }
uintptr_t CopyEngine::stream(Direction dir) const { return reinterpret_cast<uintptr_t>(impl_->stream(dir)); }

void CopyEngine::copy_batch(Direction dir, const std::vector<Segment>& copies, int layer) {
  impl_->check_layer(layer);
  DeviceGuard g(impl_->device);
  for (const Segment& c : copies) {
    if (c.bytes == 0) continue;
    CA_CUDA_CHECK(cudaMemcpyAsync(reinterpret_cast<void*>(c.dst), reinterpret_cast<const void*>(c.src), c.bytes,
                                  cudaMemcpyDefault, impl_->stream(dir)));
  }
  impl_->record(dir, layer);
}

void CopyEngine::segment_copy(Direction dir, const std::vector<Segment>& copies, int layer) {
  impl_->check_layer(layer);
  DeviceGuard g(impl_->device);
  std::vector<Segment> visible;
  visible.reserve(copies.size());
  for (const Segment& c : copies) {
    if (c.bytes == 0) continue;
    visible.push_back({device_visible(c.src, c.bytes), device_visible(c.dst, c.bytes), c.bytes});
  }
  launch_segment_copy(visible, impl_->stream(dir));
  impl_->record(dir, layer);
}

void CopyEngine::rope_copy(const RopeArgs& args, int layer) {
  impl_->check_layer(layer);
  DeviceGuard g(impl_->device);
  RopeArgs a = args;
  if (a.rows > 0) {
    size_t bytes = a.rows * static_cast<size_t>(a.head_dim) * dtype_size(a.dtype);
    a.src = device_visible(a.src, bytes);
    a.dst = device_visible(a.dst, bytes);
  }
  launch_rope_rotate(a, impl_->stream(Direction::HostToDevice));
  impl_->record(Direction::HostToDevice, layer);
}

void CopyEngine::stream_wait_layer(Direction dir, int layer, uintptr_t stream) {
  impl_->check_layer(layer);
  if (layer < 0) throw std::invalid_argument("stream_wait_layer needs a layer index");
  DeviceGuard g(impl_->device);
  CA_CUDA_CHECK(cudaStreamWaitEvent(as_stream(stream), impl_->events[static_cast<int>(dir)][layer], 0));
}

void CopyEngine::wait_for_stream(Direction dir, uintptr_t stream) {
  DeviceGuard g(impl_->device);
  cudaEvent_t f = impl_->fence[static_cast<int>(dir)];
  CA_CUDA_CHECK(cudaEventRecord(f, as_stream(stream)));
  CA_CUDA_CHECK(cudaStreamWaitEvent(impl_->stream(dir), f, 0));
}

bool CopyEngine::layer_done(Direction dir, int layer) const {
  impl_->check_layer(layer);
  if (layer < 0) throw std::invalid_argument("layer_done needs a layer index");
  cudaError_t err = cudaEventQuery(impl_->events[static_cast<int>(dir)][layer]);
  if (err == cudaErrorNotReady) {
    cudaGetLastError();
    return false;
  }
  check(err, "cudaEventQuery");
  return true;
}

void CopyEngine::synchronize(Direction dir) {
  DeviceGuard g(impl_->device);
  CA_CUDA_CHECK(cudaStreamSynchronize(impl_->stream(dir)));
}

}  // namespace cachedattn::cuda
