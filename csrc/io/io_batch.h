// Requests, the per-request transfer state both backends share, and the
// completion handle a caller waits on.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include "io/file.h"

namespace cachedattn {

enum class IoOp { Read, Write };

struct IoRequest {
  FilePtr file;
  IoOp op;
  uint64_t offset;
  uintptr_t buf;
  size_t len;
};

class IoBatch {
 public:
  explicit IoBatch(size_t requests) : remaining_(requests) {}

  // Each request ends here exactly once; err is 0 or an errno value.
  void finish(size_t bytes, int err, const std::string& message, const std::string& path);
  bool done() const;
  // Waits up to timeout_s (negative: forever); false on timeout. Throws
  // OsError for the first request that failed.
  bool wait(double timeout_s);
  uint64_t bytes() const;
  size_t failures() const;

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  size_t remaining_;
  uint64_t bytes_ = 0;
  size_t failures_ = 0;
  int err_ = 0;
  std::string err_message_;
  std::string err_path_;
};

// One request on its way: how much is left, and what to do with each result.
struct Transfer {
  // Stays under the 2 GiB Linux caps a single read/write at, and 4 KiB aligned.
  static constexpr size_t kMaxChunk = size_t{1} << 30;

  Transfer(IoRequest r, std::shared_ptr<IoBatch> b);
  ~Transfer();
  Transfer(const Transfer&) = delete;
  Transfer& operator=(const Transfer&) = delete;

  enum class Next { Done, Resubmit };

  size_t chunk() const { return left < kMaxChunk ? left : kMaxChunk; }
  int fd() const;
  char* ptr() const { return reinterpret_cast<char*>(buf); }
  // Applies one syscall or completion result (bytes moved, or -errno).
  // Short transfers, EINTR and EAGAIN resubmit; on Done the batch is told.
  Next apply(long result);

  IoRequest req;
  std::shared_ptr<IoBatch> batch;
  uint64_t offset;
  uintptr_t buf;
  size_t left;

 private:
  void fail(int err, const std::string& what);
  bool buffered_only_ = false;
  int retries_ = 0;
  bool finished_ = false;
};

}  // namespace cachedattn
