#include "io/file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <stdexcept>

#include "common/errors.h"

namespace cachedattn {

File::File(const std::string& path, const std::string& mode, DirectMode direct) : path_(path) {
  if (path.find('\0') != std::string::npos) throw std::invalid_argument("path contains a NUL byte");
  int flags;
  if (mode == "r") {
    flags = O_RDONLY;
  } else if (mode == "w") {
    flags = O_RDWR | O_CREAT | O_TRUNC;
  } else if (mode == "a") {
    flags = O_RDWR | O_CREAT;
  } else if (mode == "r+") {
    flags = O_RDWR;
  } else {
    throw std::invalid_argument("file mode must be 'r', 'w', 'a' or 'r+', not '" + mode + "'");
  }
  flags |= O_CLOEXEC;
  buffered_fd_ = ::open(path.c_str(), flags, 0644);
  if (buffered_fd_ < 0) throw_errno(errno, "cannot open file", path);
  if (direct == DirectMode::Off) return;
  // A second descriptor on the same file: truncation already happened above.
  direct_fd_ = ::open(path.c_str(), (flags & ~(O_CREAT | O_TRUNC)) | O_DIRECT, 0644);
  if (direct_fd_ < 0) {
    int err = errno;
    if (direct == DirectMode::On) {
      ::close(buffered_fd_);
      buffered_fd_ = -1;
      throw_errno(err, "cannot open file with O_DIRECT", path);
    }
    // EINVAL: the filesystem has no direct I/O (older tmpfs, some FUSE); use buffered I/O.
  }
}

File::File(int fd) : path_("<fd " + std::to_string(fd) + ">") {
  buffered_fd_ = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (buffered_fd_ < 0) throw_errno(errno, "cannot use file descriptor " + std::to_string(fd));
}

File::~File() { close_fds(); }

void File::close_fds() {
  if (direct_fd_ >= 0) ::close(direct_fd_);
  if (buffered_fd_ >= 0) ::close(buffered_fd_);
  direct_fd_ = buffered_fd_ = -1;
}

bool File::closed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return closing_;
}

void File::close() {
  std::lock_guard<std::mutex> lock(mu_);
  closing_ = true;
  if (inflight_ == 0) close_fds();
}

void File::acquire() {
  std::lock_guard<std::mutex> lock(mu_);
  if (closing_) throw OsError(EBADF, "file is closed", path_);
  ++inflight_;
}

void File::release() {
  std::lock_guard<std::mutex> lock(mu_);
  if (--inflight_ == 0 && closing_) close_fds();
}

int File::fd_for(uint64_t offset, uintptr_t buf, size_t len) const {
  // Called only between acquire() and release(), so the descriptors are open.
  return (direct_fd_ >= 0 && direct_aligned(offset, buf, len)) ? direct_fd_ : buffered_fd_;
}

uint64_t File::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  if (closing_) throw OsError(EBADF, "file is closed", path_);
  struct stat st;
  if (fstat(buffered_fd_, &st) != 0) throw_errno(errno, "cannot stat file", path_);
  return static_cast<uint64_t>(st.st_size);
}

void File::truncate(uint64_t size) {
  std::lock_guard<std::mutex> lock(mu_);
  if (closing_) throw OsError(EBADF, "file is closed", path_);
  if (ftruncate(buffered_fd_, static_cast<off_t>(size)) != 0) throw_errno(errno, "cannot truncate file", path_);
}

void File::sync() {
  std::lock_guard<std::mutex> lock(mu_);
  if (closing_) throw OsError(EBADF, "file is closed", path_);
  if (fdatasync(buffered_fd_) != 0) throw_errno(errno, "fdatasync failed", path_);
}

}  // namespace cachedattn
