#include <map>
#include <mutex>
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

const char* name(Direction d) { return d == Direction::HostToDevice ? "h2d" : "d2h"; }

}  // namespace

// Events come from a pool and go back to it when nobody holds them (a layer
// slot, a ticket, or a host waiter in flight: shared_ptr counts them). A
// returned event is handed out again only once it has completed, so a record
// never moves an event a waiter could still be bound to.
struct CopyEngine::Impl {
  using Lock = std::lock_guard<std::recursive_mutex>;
  using Event = std::shared_ptr<CUevent_st>;
  // One open epoch's layer events, per direction (an unset Event: not issued).
  struct Epoch {
    std::vector<Event> layers[2];
  };

  int device = 0;
  int layers = 0;
  cudaStream_t streams[2] = {nullptr, nullptr};
  // Guards everything below. Recursive: an event's deleter takes it, and runs
  // both under it (a slot overwritten) and outside it (a waiter's copy dropped).
  std::recursive_mutex mu;
  int64_t latest = 0;                // the most recently begun epoch (what epoch -1 names)
  std::map<int64_t, Epoch> epochs;   // the open ones: each load (turn, read buffer) has its own
  std::map<int64_t, Event> tickets;
  int64_t next_ticket = 1;  // 0 is never a ticket: callers may use it for "none"
  std::vector<cudaEvent_t> idle;  // returned to the pool, maybe still pending
  std::vector<cudaEvent_t> all;   // destroyed with the engine
  cudaEvent_t fence[2] = {nullptr, nullptr};

  cudaStream_t stream(Direction d) const { return streams[static_cast<int>(d)]; }

  void check_layer(int layer) const {
    if (layer < -1 || layer >= layers)
      throw std::invalid_argument("layer " + std::to_string(layer) + " out of range for an engine of " +
                                  std::to_string(layers) + " layers");
  }
  void check_layer_index(int layer, const char* what) const {
    check_layer(layer);
    if (layer < 0) throw std::invalid_argument(std::string(what) + " needs a layer index");
  }

  // Caller holds mu.
  Event acquire() {
    cudaEvent_t e = nullptr;
    for (size_t i = 0; i < idle.size(); ++i) {
      cudaError_t q = cudaEventQuery(idle[i]);
      if (q == cudaSuccess) {
        e = idle[i];
        idle[i] = idle.back();
        idle.pop_back();
        break;
      }
      if (q == cudaErrorNotReady) cudaGetLastError();  // not an error: still pending
      else check(q, "cudaEventQuery");
    }
    if (!e) {
      CA_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
      all.push_back(e);
    }
    return Event(e, [this](cudaEvent_t ev) {
      Lock lock(mu);
      idle.push_back(ev);
    });
  }

  int64_t resolve(int64_t e) const { return e < 0 ? latest : e; }

  // An open epoch; caller holds mu. Checked before anything is queued.
  Epoch& open(int64_t e) {
    auto it = epochs.find(resolve(e));
    if (it == epochs.end()) throw std::runtime_error("epoch " + std::to_string(resolve(e)) + " is not open");
    return it->second;
  }

  // Caller holds mu.
  void record(Direction d, int layer, int64_t e) {
    if (layer < 0) return;
    Epoch& ep = open(e);
    Event ev = acquire();
    CA_CUDA_CHECK(cudaEventRecord(ev.get(), stream(d)));
    ep.layers[static_cast<int>(d)][layer] = std::move(ev);
  }

  // The layer's event of epoch e; caller holds mu.
  Event current(Direction d, int layer, int64_t e) const {
    auto it = epochs.find(resolve(e));
    const Event* ev = it == epochs.end() ? nullptr : &it->second.layers[static_cast<int>(d)][layer];
    if (!ev || !*ev)
      throw std::runtime_error("layer " + std::to_string(layer) + " of direction " + name(d) +
                               " was not issued in epoch " + std::to_string(resolve(e)));
    return *ev;
  }

  Event ticket(int64_t id) const {
    auto it = tickets.find(id);
    if (it == tickets.end())
      throw std::invalid_argument("ticket " + std::to_string(id) + " is unknown or already released");
    return it->second;
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
  note_device_used(device);
  DeviceGuard g(device);
  for (int d = 0; d < 2; ++d) {
    // Non-blocking: copies must not serialise with the legacy default stream.
    CA_CUDA_CHECK(cudaStreamCreateWithFlags(&impl_->streams[d], cudaStreamNonBlocking));
    CA_CUDA_CHECK(cudaEventCreateWithFlags(&impl_->fence[d], cudaEventDisableTiming));
  }
  impl_->epochs[0].layers[0].resize(num_layers);
  impl_->epochs[0].layers[1].resize(num_layers);
}

CopyEngine::~CopyEngine() {
  if (!impl_) return;
  cudaSetDevice(impl_->device);
  for (int d = 0; d < 2; ++d)
    if (impl_->streams[d]) cudaStreamSynchronize(impl_->streams[d]);
  impl_->epochs.clear();
  impl_->tickets.clear();
  for (auto e : impl_->all) cudaEventDestroy(e);
  for (int d = 0; d < 2; ++d) {
    if (impl_->fence[d]) cudaEventDestroy(impl_->fence[d]);
    if (impl_->streams[d]) cudaStreamDestroy(impl_->streams[d]);
  }
  cudaGetLastError();
}

int CopyEngine::device() const { return impl_->device; }
int CopyEngine::num_layers() const { return impl_->layers; }
uintptr_t CopyEngine::stream(Direction dir) const { return reinterpret_cast<uintptr_t>(impl_->stream(dir)); }

int64_t CopyEngine::begin_epoch() {
  Impl::Lock lock(impl_->mu);
  Impl::Epoch& e = impl_->epochs[++impl_->latest];
  for (int d = 0; d < 2; ++d) e.layers[d].resize(impl_->layers);
  return impl_->latest;
}

void CopyEngine::end_epoch(int64_t epoch) {
  Impl::Lock lock(impl_->mu);
  impl_->epochs.erase(impl_->resolve(epoch));  // its events go back to the pool once no waiter holds them
}

void CopyEngine::copy_batch(Direction dir, const std::vector<Segment>& copies, int layer, int64_t epoch) {
  impl_->check_layer(layer);
  DeviceGuard g(impl_->device);
  // Checked before anything is queued: a refused batch leaves no half-issued copies.
  for (const Segment& c : copies) {
    if (c.bytes == 0) continue;
    require_dma_capable(c.src, c.bytes);
    require_dma_capable(c.dst, c.bytes);
  }
  Impl::Lock lock(impl_->mu);
  if (layer >= 0) impl_->open(epoch);
  for (const Segment& c : copies) {
    if (c.bytes == 0) continue;
    CA_CUDA_CHECK(cudaMemcpyAsync(reinterpret_cast<void*>(c.dst), reinterpret_cast<const void*>(c.src), c.bytes,
                                  cudaMemcpyDefault, impl_->stream(dir)));
  }
  impl_->record(dir, layer, epoch);
}

void CopyEngine::copy_2d(Direction dir, uintptr_t src, size_t src_pitch, uintptr_t dst, size_t dst_pitch,
                         size_t width, size_t height, int layer, int64_t epoch) {
  impl_->check_layer(layer);
  if (width > src_pitch || width > dst_pitch)
    throw std::invalid_argument("copy_2d: width " + std::to_string(width) + " exceeds a pitch (src " +
                                std::to_string(src_pitch) + ", dst " + std::to_string(dst_pitch) + ")");
  DeviceGuard g(impl_->device);
  if (width && height) {
    size_t span_src = (height - 1) * src_pitch + width, span_dst = (height - 1) * dst_pitch + width;
    require_dma_capable(src, span_src);
    require_dma_capable(dst, span_dst);
  }
  Impl::Lock lock(impl_->mu);
  if (layer >= 0) impl_->open(epoch);
  if (width && height)
    CA_CUDA_CHECK(cudaMemcpy2DAsync(reinterpret_cast<void*>(dst), dst_pitch, reinterpret_cast<const void*>(src),
                                    src_pitch, width, height, cudaMemcpyDefault, impl_->stream(dir)));
  impl_->record(dir, layer, epoch);
}

void CopyEngine::segment_copy(Direction dir, const std::vector<Segment>& copies, int layer, int64_t epoch) {
  impl_->check_layer(layer);
  DeviceGuard g(impl_->device);
  std::vector<Segment> visible;
  visible.reserve(copies.size());
  for (const Segment& c : copies) {
    if (c.bytes == 0) continue;
    visible.push_back({device_visible(c.src, c.bytes), device_visible(c.dst, c.bytes), c.bytes});
  }
  Impl::Lock lock(impl_->mu);
  if (layer >= 0) impl_->open(epoch);
  launch_segment_copy(visible, impl_->stream(dir));
  impl_->record(dir, layer, epoch);
}

void CopyEngine::rope_copy(const RopeArgs& args, int layer, int64_t epoch) {
  impl_->check_layer(layer);
  DeviceGuard g(impl_->device);
  RopeArgs a = args;
  if (a.rows > 0) {
    size_t bytes = a.rows * static_cast<size_t>(a.head_dim) * dtype_size(a.dtype);
    a.src = device_visible(a.src, bytes);
    a.dst = device_visible(a.dst, bytes);
  }
  Impl::Lock lock(impl_->mu);
  if (layer >= 0) impl_->open(epoch);
  launch_rope_rotate(a, impl_->stream(Direction::HostToDevice));
  impl_->record(Direction::HostToDevice, layer, epoch);
}

void CopyEngine::stream_wait_layer(Direction dir, int layer, uintptr_t stream, int64_t epoch) {
  impl_->check_layer_index(layer, "stream_wait_layer");
  DeviceGuard g(impl_->device);
  Impl::Lock lock(impl_->mu);
  // Binds to the event's current record at call time; a later re-record of
  // the same event cannot move this wait.
  CA_CUDA_CHECK(cudaStreamWaitEvent(as_stream(stream), impl_->current(dir, layer, epoch).get(), 0));
}

void CopyEngine::wait_layer(Direction dir, int layer, int64_t epoch) {
  impl_->check_layer_index(layer, "wait_layer");
  Impl::Event ev;
  {
    Impl::Lock lock(impl_->mu);
    ev = impl_->current(dir, layer, epoch);  // our reference keeps it out of the pool while we wait
  }
  DeviceGuard g(impl_->device);
  CA_CUDA_CHECK(cudaEventSynchronize(ev.get()));
}

void CopyEngine::wait_for_stream(Direction dir, uintptr_t stream) {
  DeviceGuard g(impl_->device);
  // One fence per direction is enough: cudaStreamWaitEvent binds to the
  // fence's most recent record when it is called ("subsequent calls will not
  // have any effect on stream", CUDA runtime docs), so re-recording it later
  // cannot move a wait already queued. The lock keeps another thread's
  // record from landing between our record and our wait.
  Impl::Lock lock(impl_->mu);
  cudaEvent_t f = impl_->fence[static_cast<int>(dir)];
  CA_CUDA_CHECK(cudaEventRecord(f, as_stream(stream)));
  CA_CUDA_CHECK(cudaStreamWaitEvent(impl_->stream(dir), f, 0));
}

namespace {
bool query(cudaEvent_t e) {
  cudaError_t err = cudaEventQuery(e);
  if (err == cudaErrorNotReady) {
    cudaGetLastError();
    return false;
  }
  check(err, "cudaEventQuery");
  return true;
}
}  // namespace

bool CopyEngine::layer_done(Direction dir, int layer, int64_t epoch) const {
  impl_->check_layer_index(layer, "layer_done");
  Impl::Lock lock(impl_->mu);
  return query(impl_->current(dir, layer, epoch).get());
}

int64_t CopyEngine::record(Direction dir) {
  DeviceGuard g(impl_->device);
  Impl::Lock lock(impl_->mu);
  Impl::Event ev = impl_->acquire();
  CA_CUDA_CHECK(cudaEventRecord(ev.get(), impl_->stream(dir)));
  int64_t id = impl_->next_ticket++;
  impl_->tickets.emplace(id, std::move(ev));
  return id;
}

bool CopyEngine::ticket_done(int64_t ticket) {
  Impl::Lock lock(impl_->mu);
  if (!query(impl_->ticket(ticket).get())) return false;
  impl_->tickets.erase(ticket);
  return true;
}

void CopyEngine::wait_ticket(int64_t ticket) {
  Impl::Event ev;
  {
    Impl::Lock lock(impl_->mu);
    ev = impl_->ticket(ticket);
  }
  DeviceGuard g(impl_->device);
  CA_CUDA_CHECK(cudaEventSynchronize(ev.get()));
  Impl::Lock lock(impl_->mu);
  impl_->tickets.erase(ticket);
}

void CopyEngine::synchronize(Direction dir) {
  DeviceGuard g(impl_->device);
  CA_CUDA_CHECK(cudaStreamSynchronize(impl_->stream(dir)));
}

}  // namespace cachedattn::cuda
