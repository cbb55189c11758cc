#include "io/io_engine.h"

#include <cerrno>
#include <fstream>
#include <stdexcept>

#include "common/errors.h"
#include "io/thread_pool_io.h"
#ifdef CACHEDATTN_WITH_URING
#include "io/uring_io.h"
#endif

namespace cachedattn {

bool uring_built() {
#ifdef CACHEDATTN_WITH_URING
  return true;
#else
  return false;
#endif
}

std::shared_ptr<IoBatch> IoEngine::submit(const std::vector<IoRequest>& requests) {
  for (const auto& r : requests) {
    if (!r.file) throw std::invalid_argument("I/O request without a file");
    if (r.len > 0 && r.buf == 0) throw std::invalid_argument("I/O request with a null buffer");
  }
  auto batch = std::make_shared<IoBatch>(requests.size());
  std::vector<std::unique_ptr<Transfer>> transfers;
  transfers.reserve(requests.size());
  for (const auto& r : requests) {
    auto t = std::make_unique<Transfer>(r, batch);
    if (r.len == 0) {
      t->apply(0);  // nothing to move: completes at once
      continue;
    }
    transfers.push_back(std::move(t));
  }
  if (!transfers.empty()) enqueue(std::move(transfers));
  return batch;
}

namespace {

// kernel.io_uring_disabled: 0 allowed, 1 only for io_uring_group, 2 refused.
int read_uring_sysctl(const std::string& path) {
  std::ifstream in(path);
  int v = 0;
  if (in >> v) return v;
  return 0;  // absent on kernels before 6.6, where io_uring is allowed
}

}  // namespace

std::unique_ptr<IoEngine> make_io_engine(const IoEngineOptions& o, std::string* why_fallback) {
  if (o.backend != "auto" && o.backend != "io_uring" && o.backend != "threads")
    throw std::invalid_argument("I/O backend must be 'auto', 'io_uring' or 'threads', not '" + o.backend + "'");
  if (o.threads < 1 || o.threads > 256)
    throw std::invalid_argument("I/O threads must be in 1..256, got " + std::to_string(o.threads));
  std::string reason;
  if (o.backend == "threads") {
    reason = "the thread-pool backend was requested";
  } else if (!uring_built()) {
    if (o.backend == "io_uring")
      throw OsError(ENOSYS, "io_uring backend requested, but cachedattn was built without liburing");
    reason = "cachedattn was built without liburing";
  } else if (int v = read_uring_sysctl(o.uring_sysctl); v == 2) {
    reason = "io_uring is disabled by the kernel (" + o.uring_sysctl + " = 2)";
    if (o.backend == "io_uring") throw OsError(EPERM, "io_uring backend requested, but " + reason);
  } else {
#ifdef CACHEDATTN_WITH_URING
    try {
      return std::make_unique<UringIo>(o.threads, o.queue_depth, o.fixed_region);
    } catch (const OsError& e) {
      if (o.backend == "io_uring") throw;
      // EPERM/ENOSYS: seccomp in containers, or a kernel without io_uring.
      reason = e.what();
    }
#endif
  }
  if (why_fallback) *why_fallback = reason;
  return std::make_unique<ThreadPoolIo>(o.threads);
}

}  // namespace cachedattn
