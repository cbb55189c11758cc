// The only file that includes liburing.
#include "io/uring_io.h"

#include <liburing.h>
#include <sys/uio.h>

#include <cerrno>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

#include "common/errors.h"
#include "memory/host_pool.h"

namespace cachedattn {

namespace {
// A registered buffer may not exceed 1 GiB, so a large region is registered in slices.
constexpr size_t kFixedSlice = size_t{1} << 30;
}  // namespace

struct UringIo::Worker {
  io_uring ring{};
  unsigned depth;
  std::shared_ptr<Region> fixed;  // kept mapped while the ring has it registered
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::unique_ptr<Transfer>> pending;
  bool stop = false;
  std::thread thread;

  Worker(unsigned queue_depth, std::shared_ptr<Region> region) : depth(queue_depth) {
    int rc = io_uring_queue_init(depth, &ring, 0);
    if (rc < 0) throw_errno(-rc, "io_uring_queue_init failed");
    if (region) register_fixed(std::move(region));
    thread = std::thread([this] { run(); });
  }

  ~Worker() {
    {
      std::lock_guard<std::mutex> lock(mu);
      stop = true;
    }
    cv.notify_all();
    thread.join();
    io_uring_queue_exit(&ring);
  }

  void register_fixed(std::shared_ptr<Region> region) {
    std::vector<iovec> iov;
    for (size_t off = 0; off < region->bytes(); off += kFixedSlice) {
      size_t len = std::min(kFixedSlice, region->bytes() - off);
      iov.push_back({region->base() + off, len});
    }
    // Refusal (memlock limits, old kernels) only costs the fixed-buffer speedup.
    if (io_uring_register_buffers(&ring, iov.data(), static_cast<unsigned>(iov.size())) == 0) fixed = std::move(region);
  }

  // Index of the registered slice holding [p, p + n), or -1.
  int fixed_index(const char* p, size_t n) const {
    if (!fixed || p < fixed->base()) return -1;
    size_t off = static_cast<size_t>(p - fixed->base());
    if (off + n > fixed->bytes()) return -1;
    size_t idx = off / kFixedSlice;
    if ((off + n - 1) / kFixedSlice != idx) return -1;
    return static_cast<int>(idx);
  }

  void prep(io_uring_sqe* sqe, Transfer* t) {
    unsigned n = static_cast<unsigned>(t->chunk());
    int fd = t->fd();
    int idx = fixed_index(t->ptr(), n);
    if (t->req.op == IoOp::Read) {
      if (idx >= 0)
        io_uring_prep_read_fixed(sqe, fd, t->ptr(), n, t->offset, idx);
      else
        io_uring_prep_read(sqe, fd, t->ptr(), n, t->offset);
    } else {
      if (idx >= 0)
        io_uring_prep_write_fixed(sqe, fd, t->ptr(), n, t->offset, idx);
      else
        io_uring_prep_write(sqe, fd, t->ptr(), n, t->offset);
    }
    io_uring_sqe_set_data(sqe, t);
  }

  void run() {
    std::deque<std::unique_ptr<Transfer>> ready;
    unsigned inflight = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu);
        if (ready.empty() && inflight == 0) cv.wait(lock, [this] { return stop || !pending.empty(); });
        while (!pending.empty()) {
          ready.push_back(std::move(pending.front()));
          pending.pop_front();
        }
        if (stop && ready.empty() && inflight == 0) return;
      }
      while (!ready.empty() && inflight < depth) {
        io_uring_sqe* sqe = io_uring_get_sqe(&ring);
        if (sqe == nullptr) break;
        prep(sqe, ready.front().release());
        ready.pop_front();
        ++inflight;
      }
      // Blocks for one completion when anything is in flight; new work
      // queued meanwhile is picked up right after it.
      int rc = io_uring_submit_and_wait(&ring, inflight > 0 ? 1 : 0);
      if (rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY) std::this_thread::yield();
      io_uring_cqe* cqe;
      unsigned head;
      unsigned seen = 0;
      io_uring_for_each_cqe(&ring, head, cqe) {
        std::unique_ptr<Transfer> t(static_cast<Transfer*>(io_uring_cqe_get_data(cqe)));
        ++seen;
        --inflight;
        if (t->apply(cqe->res) == Transfer::Next::Resubmit) ready.push_back(std::move(t));
      }
      io_uring_cq_advance(&ring, seen);
    }
  }
};

UringIo::UringIo(int threads, int queue_depth, std::shared_ptr<Region> fixed_region) {
  if (threads < 1) threads = 1;
  if (queue_depth < 1 || queue_depth > 4096)
    throw std::invalid_argument("queue_depth must be in 1..4096, got " + std::to_string(queue_depth));
  for (int i = 0; i < threads; ++i)
    workers_.push_back(std::make_unique<Worker>(static_cast<unsigned>(queue_depth), fixed_region));
}

UringIo::~UringIo() = default;

bool UringIo::fixed_buffers() const { return !workers_.empty() && workers_[0]->fixed != nullptr; }

void UringIo::enqueue(std::vector<std::unique_ptr<Transfer>> transfers) {
  // Spread requests over the rings so one large batch uses every worker.
  size_t w = next_.fetch_add(1);
  std::vector<std::vector<std::unique_ptr<Transfer>>> per(workers_.size());
  for (auto& t : transfers) per[w++ % workers_.size()].push_back(std::move(t));
  for (size_t i = 0; i < workers_.size(); ++i) {
    if (per[i].empty()) continue;
    Worker& wk = *workers_[i];
    {
      std::lock_guard<std::mutex> lock(wk.mu);
      for (auto& t : per[i]) wk.pending.push_back(std::move(t));
    }
    wk.cv.notify_one();
  }
}

}  // namespace cachedattn
