// Batched asynchronous file I/O with a backend chosen at runtime:
// io_uring where it is built and the kernel allows it, else a thread pool.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "io/io_batch.h"

namespace cachedattn {

class Region;

class IoEngine {
 public:
  virtual ~IoEngine() = default;
  virtual std::string name() const = 0;
  virtual int threads() const = 0;
  // Returns at once; the batch completes when every request has.
  std::shared_ptr<IoBatch> submit(const std::vector<IoRequest>& requests);

 protected:
  virtual void enqueue(std::vector<std::unique_ptr<Transfer>> transfers) = 0;
};

struct IoEngineOptions {
  std::string backend = "auto";  // "auto", "io_uring" or "threads"
  int threads = 2;               // worker threads (each io_uring worker owns one ring)
  int queue_depth = 64;          // io_uring entries per ring
  // Where the kernel says whether io_uring is allowed; a parameter so tests
  // can stand in for a kernel that forbids it.
  std::string uring_sysctl = "/proc/sys/kernel/io_uring_disabled";
  std::shared_ptr<Region> fixed_region;  // registered as fixed buffers when set
};

// *why_fallback says why io_uring was not used when "auto" fell back.
std::unique_ptr<IoEngine> make_io_engine(const IoEngineOptions& options, std::string* why_fallback);

bool uring_built();

}  // namespace cachedattn
