#include "io/file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <stdexcept>

#include "common/errors.h"

namespace cachedattn {

namespace {

int open_flags(const std::string& mode) {
  if (mode == "r") return O_RDONLY;
  if (mode == "w") return O_RDWR | O_CREAT | O_TRUNC;
  if (mode == "a") return O_RDWR | O_CREAT;
  if (mode == "r+") return O_RDWR;
  if (mode == "x") return O_RDWR | O_CREAT | O_EXCL;
  throw std::invalid_argument("file mode must be 'r', 'w', 'a', 'r+' or 'x', not '" + mode + "'");
}

// The flags of a second descriptor on a file that the first one already created.
int reopen_flags(int flags) { return flags & ~(O_CREAT | O_TRUNC | O_EXCL); }

[[noreturn]] void throw_not_regular(const struct stat& st, const std::string& name) {
  if (S_ISDIR(st.st_mode)) throw OsError(EISDIR, "not a regular file (a directory)", name);
  throw OsError(EINVAL, "not a regular file", name);
}

[[noreturn]] void throw_open_errno(int err, const std::string& name) {
  if (err == ELOOP) throw OsError(err, "refusing to open a symbolic link", name);
  throw_errno(err, "cannot open file", name);
}

}  // namespace

File::File(const std::string& path, const std::string& mode, DirectMode direct) : path_(path) {
  if (path.find('\0') != std::string::npos) throw std::invalid_argument("path contains a NUL byte");
  int flags = open_flags(mode) | O_CLOEXEC;
  buffered_fd_ = ::open(path.c_str(), flags, 0644);
  if (buffered_fd_ < 0) throw_errno(errno, "cannot open file", path);
  if (direct == DirectMode::Off) return;
  // A second descriptor on the same file: creation and truncation already happened above.
  direct_fd_ = ::open(path.c_str(), reopen_flags(flags) | O_DIRECT, 0644);
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

std::shared_ptr<File> File::openat(int dir_fd, const std::string& name, const std::string& mode,
                                   DirectMode direct, const std::string& label) {
  if (name.find('\0') != std::string::npos) throw std::invalid_argument("file name contains a NUL byte");
  if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos)
    throw std::invalid_argument("file name must be one path component, not '" + name + "'");
  int flags = open_flags(mode) | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY;
  std::shared_ptr<File> f(new File());
  f->path_ = label.empty() ? name : label;
  const std::string& shown = f->path_;
  // Looked at before opening, so that a device node planted under this name is
  // never opened (opening some devices acts on them); fstat below closes the race.
  struct stat st;
  if (fstatat(dir_fd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0) {
    if (S_ISLNK(st.st_mode)) throw_open_errno(ELOOP, shown);
    if (!S_ISREG(st.st_mode)) throw_not_regular(st, shown);
  } else if (errno != ENOENT || !(flags & O_CREAT)) {
    throw_open_errno(errno, shown);
  }
  // O_NONBLOCK: a FIFO swapped in after the check must not block the open.
  f->buffered_fd_ = ::openat(dir_fd, name.c_str(), flags | O_NONBLOCK, 0644);
  if (f->buffered_fd_ < 0) throw_open_errno(errno, shown);
  if (fstat(f->buffered_fd_, &st) != 0) throw_errno(errno, "cannot stat file", shown);
  if (!S_ISREG(st.st_mode)) throw_not_regular(st, shown);
  if (fcntl(f->buffered_fd_, F_SETFL, fcntl(f->buffered_fd_, F_GETFL) & ~O_NONBLOCK) != 0)
    throw_errno(errno, "cannot make file blocking", shown);
  if (direct == DirectMode::Off) return f;
  int dfd = ::openat(dir_fd, name.c_str(), reopen_flags(flags) | O_DIRECT, 0644);
  if (dfd < 0) {
    int err = errno;
    if (direct == DirectMode::On) throw_errno(err, "cannot open file with O_DIRECT", shown);
    return f;  // no direct I/O on this filesystem: buffered only
  }
  f->direct_fd_ = dfd;
  // The name is looked up twice: both descriptors must be the same file.
  struct stat dst;
  if (fstat(dfd, &dst) != 0) throw_errno(errno, "cannot stat file", shown);
  if (dst.st_dev != st.st_dev || dst.st_ino != st.st_ino)
    throw OsError(ESTALE, "file was replaced while it was being opened", shown);
  return f;
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
