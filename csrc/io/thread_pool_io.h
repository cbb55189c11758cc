#pragma once
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

#include "io/io_engine.h"

namespace cachedattn {

// pread/pwrite on a pool of threads: works on every kernel and in every sandbox.
class ThreadPoolIo final : public IoEngine {
 public:
  explicit ThreadPoolIo(int threads);
  ~ThreadPoolIo() override;
  std::string name() const override { return "threads"; }
  int threads() const override { return static_cast<int>(workers_.size()); }

 protected:
  void enqueue(std::vector<std::unique_ptr<Transfer>> transfers) override;

 private:
  void run();

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::unique_ptr<Transfer>> queue_;
  bool stop_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace cachedattn
