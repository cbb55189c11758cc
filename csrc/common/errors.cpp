#include "common/errors.h"

#include <cstring>

namespace cachedattn {

OsError::OsError(int err, const std::string& message, std::string path)
    : std::runtime_error(message + (path.empty() ? "" : ": '" + path + "'")),
      code_(err),
      message_(message),
      path_(std::move(path)) {}

void throw_errno(int err, const std::string& what, const std::string& path) {
  throw OsError(err, what + ": " + std::strerror(err), path);
}

}  // namespace cachedattn
