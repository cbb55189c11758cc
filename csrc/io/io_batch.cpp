#include "io/io_batch.h"

#include <cerrno>
#include <chrono>
#include <cstring>

#include "common/errors.h"

namespace cachedattn {

void IoBatch::finish(size_t bytes, int err, const std::string& message, const std::string& path) {
  std::lock_guard<std::mutex> lock(mu_);
  bytes_ += bytes;
  if (err != 0 && failures_++ == 0) {
    err_ = err;
    err_message_ = message;
    err_path_ = path;
  }
  if (--remaining_ == 0) cv_.notify_all();
}

bool IoBatch::done() const {
  std::lock_guard<std::mutex> lock(mu_);
  return remaining_ == 0;
}

bool IoBatch::wait(double timeout_s) {
  std::unique_lock<std::mutex> lock(mu_);
  auto ready = [this] { return remaining_ == 0; };
  if (timeout_s < 0) {
    cv_.wait(lock, ready);
  } else if (!cv_.wait_for(lock, std::chrono::duration<double>(timeout_s), ready)) {
    return false;
  }
  if (failures_ != 0) {
    std::string msg = err_message_;
    if (failures_ > 1) msg += " (and " + std::to_string(failures_ - 1) + " more failed requests in this batch)";
    throw OsError(err_, msg, err_path_);
  }
  return true;
}

uint64_t IoBatch::bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return bytes_;
}

size_t IoBatch::failures() const {
  std::lock_guard<std::mutex> lock(mu_);
  return failures_;
}

Transfer::Transfer(IoRequest r, std::shared_ptr<IoBatch> b)
    : req(std::move(r)), batch(std::move(b)), offset(req.offset), buf(req.buf), left(req.len) {
  req.file->acquire();
}

Transfer::~Transfer() {
  // A transfer dropped unfinished (engine torn down) still ends its request.
  if (!finished_) fail(ECANCELED, "I/O engine shut down before the request completed");
  req.file->release();
}

int Transfer::fd() const {
  if (buffered_only_) return req.file->buffered_fd();
  return req.file->fd_for(offset, buf, chunk());
}

void Transfer::fail(int err, const std::string& what) {
  finished_ = true;
  const char* op = req.op == IoOp::Read ? "read" : "write";
  std::string msg = std::string(op) + " of " + std::to_string(req.len) + " bytes at offset " +
                    std::to_string(req.offset) + " failed after " + std::to_string(req.len - left) + " bytes: " + what;
  batch->finish(req.len - left, err, msg, req.file->path());
}

Transfer::Next Transfer::apply(long result) {
  if (result == -EINTR || result == -EAGAIN) {
    if (++retries_ > 1000) {
      fail(EAGAIN, std::strerror(EAGAIN));
      return Next::Done;
    }
    return Next::Resubmit;
  }
  if (result == -EINVAL && !buffered_only_ && req.file->direct() && fd() != req.file->buffered_fd()) {
    // The filesystem took O_DIRECT at open but refuses this transfer: go buffered.
    buffered_only_ = true;
    return Next::Resubmit;
  }
  if (result < 0) {
    fail(static_cast<int>(-result), std::strerror(static_cast<int>(-result)));
    return Next::Done;
  }
  if (result == 0 && left > 0) {
    if (req.op == IoOp::Read) {
      fail(ENODATA, "unexpected end of file at offset " + std::to_string(offset));
    } else {
      fail(EIO, "the device accepted no bytes");
    }
    return Next::Done;
  }
  offset += static_cast<uint64_t>(result);
  buf += static_cast<uintptr_t>(result);
  left -= static_cast<size_t>(result);
  if (left > 0) return Next::Resubmit;
  finished_ = true;
  batch->finish(req.len, 0, {}, {});
  return Next::Done;
}

}  // namespace cachedattn
