#pragma once
#include <atomic>
#include <memory>
#include <vector>

#include "io/io_engine.h"

namespace cachedattn {

// io_uring via liburing: one ring per worker thread, short transfers and
// EAGAIN requeued, pool memory registered as fixed buffers when given.
class UringIo final : public IoEngine {
 public:
  // Throws OsError with io_uring_queue_init's errno when the kernel refuses.
  UringIo(int threads, int queue_depth, std::shared_ptr<Region> fixed_region);
  ~UringIo() override;
  std::string name() const override { return "io_uring"; }
  int threads() const override { return static_cast<int>(workers_.size()); }
  bool fixed_buffers() const;

 protected:
  void enqueue(std::vector<std::unique_ptr<Transfer>> transfers) override;

 private:
  struct Worker;
  std::vector<std::unique_ptr<Worker>> workers_;
  std::atomic<size_t> next_{0};
};

}  // namespace cachedattn
