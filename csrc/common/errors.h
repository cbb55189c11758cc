// Error types shared by the native core. The bindings translate them:
// OsError -> OSError(errno, message, path), std::invalid_argument -> ValueError.
#pragma once
#include <stdexcept>
#include <string>

namespace cachedattn {

class OsError : public std::runtime_error {
 public:
  OsError(int err, const std::string& message, std::string path = {});
  int code() const noexcept { return code_; }
  const std::string& path() const noexcept { return path_; }
  // The message without the "[Errno N]" decoration Python adds itself.
  const std::string& message() const noexcept { return message_; }

 private:
  int code_;
  std::string message_;
  std::string path_;
};

[[noreturn]] void throw_errno(int err, const std::string& what, const std::string& path = {});

}  // namespace cachedattn
