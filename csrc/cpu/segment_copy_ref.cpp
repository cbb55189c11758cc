#include <cstring>

#include "cpu/kernels_ref.h"

namespace cachedattn::cpu {

void segment_copy(const std::vector<Segment>& segments) {
  for (const auto& s : segments) {
    if (s.bytes == 0) continue;
    if (s.src == 0 || s.dst == 0) throw std::invalid_argument("segment with a null pointer");
    std::memcpy(reinterpret_cast<void*>(s.dst), reinterpret_cast<const void*>(s.src), s.bytes);
  }
}

}  // namespace cachedattn::cpu
