// A file opened for the I/O engine: an O_DIRECT descriptor where the
// filesystem takes one, and a buffered descriptor for unaligned requests.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

namespace cachedattn {

enum class DirectMode { Off, Auto, On };

class File {
 public:
  static constexpr size_t kDirectAlign = 4096;

  // mode: "r" (read), "w" (write, create, truncate), "a" (read/write, create),
  // "r+" (read/write existing), "x" (read/write, create, fail if it exists).
  File(const std::string& path, const std::string& mode, DirectMode direct);
  // `name` inside the directory open as dir_fd, never through a symbolic link
  // (O_NOFOLLOW on both descriptors) and only when it is a regular file: a
  // FIFO or device in its place is refused without blocking. `label` names the
  // file in errors and path() (default: name).
  static std::shared_ptr<File> openat(int dir_fd, const std::string& name, const std::string& mode,
                                      DirectMode direct, const std::string& label = {});
  // Wraps a caller's descriptor (duplicated, so the caller keeps its own);
  // transfers use it as it was opened.
  explicit File(int fd);
  ~File();
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  const std::string& path() const { return path_; }
  bool direct() const { return direct_fd_ >= 0; }
  bool closed() const;
  // The descriptor to use for this transfer: direct when everything is aligned.
  int fd_for(uint64_t offset, uintptr_t buf, size_t len) const;
  int buffered_fd() const { return buffered_fd_; }
  uint64_t size() const;
  void truncate(uint64_t size);
  void sync();  // fdatasync: data durable on return
  // Refuses new transfers; the descriptors close once those in flight end,
  // so a descriptor number is never reused under a running transfer.
  void close();

  // Transfers hold the file open between these two calls.
  void acquire();
  void release();

 private:
  File() = default;
  void open_direct(int dir_fd, int flags, DirectMode direct);
  void close_fds();

  mutable std::mutex mu_;
  bool closing_ = false;
  int inflight_ = 0;
  std::string path_;
  int buffered_fd_ = -1;
  int direct_fd_ = -1;
};

using FilePtr = std::shared_ptr<File>;

inline bool direct_aligned(uint64_t offset, uintptr_t buf, size_t len) {
  return ((offset | buf | len) & (File::kDirectAlign - 1)) == 0;
}

}  // namespace cachedattn
