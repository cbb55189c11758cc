#include "io/thread_pool_io.h"

#include <unistd.h>

#include <cerrno>

namespace cachedattn {

ThreadPoolIo::ThreadPoolIo(int threads) {
  if (threads < 1) threads = 1;
  for (int i = 0; i < threads; ++i) workers_.emplace_back([this] { run(); });
}

ThreadPoolIo::~ThreadPoolIo() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPoolIo::enqueue(std::vector<std::unique_ptr<Transfer>> transfers) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& t : transfers) queue_.push_back(std::move(t));
  }
  cv_.notify_all();
}

void ThreadPoolIo::run() {
  for (;;) {
    std::unique_ptr<Transfer> t;
    {
      std::unique_lock<std::mutex> lock(mu_);
      // Queued work is finished even when stopping: callers wait on it.
      cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;
      t = std::move(queue_.front());
      queue_.pop_front();
    }
    for (;;) {
      ssize_t n = t->req.op == IoOp::Read ? ::pread(t->fd(), t->ptr(), t->chunk(), static_cast<off_t>(t->offset))
                                          : ::pwrite(t->fd(), t->ptr(), t->chunk(), static_cast<off_t>(t->offset));
      if (t->apply(n < 0 ? -errno : n) == Transfer::Next::Done) break;
    }
  }
}

}  // namespace cachedattn
