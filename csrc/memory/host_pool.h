// One host region, mapped once, split into fixed-size blocks.
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace cachedattn {

enum class HugePages { Off, Auto, On };

// The mapping itself. Shared by the pool and every exported view of a block,
// so it is unmapped exactly once, after the last user lets go.
class Region {
 public:
  Region(size_t bytes, HugePages mode, bool register_cuda);
  ~Region();
  Region(const Region&) = delete;
  Region& operator=(const Region&) = delete;

  char* base() const { return base_; }
  size_t bytes() const { return bytes_; }
  const std::string& page_kind() const { return page_kind_; }  // "hugetlb", "thp" or "4k"
  bool cuda_registered() const { return cuda_registered_; }

  static int64_t live_count() { return live_.load(); }

 private:
  char* base_ = nullptr;
  size_t bytes_ = 0;
  size_t mapped_bytes_ = 0;
  std::string page_kind_;
  bool cuda_registered_ = false;
  static std::atomic<int64_t> live_;
};

class HostPool {
 public:
  static constexpr size_t kAlign = 4096;  // O_DIRECT needs 4 KiB-aligned buffers

  HostPool(size_t capacity_bytes, size_t block_bytes, HugePages mode, bool register_cuda);

  // A free block's index, or nothing when the pool is exhausted.
  std::optional<size_t> alloc();
  // Throws std::invalid_argument on double free or an index out of range.
  void free(size_t index);
  // The block starting exactly at `address`; throws for foreign pointers.
  size_t index_of(uintptr_t address) const;
  uintptr_t address_of(size_t index) const;

  size_t block_bytes() const { return block_bytes_; }
  size_t num_blocks() const { return num_blocks_; }
  size_t num_free() const;
  bool closed() const;
  // Drops the pool's hold on the region; blocks still viewed stay readable
  // until their views go.
  void close();
  std::shared_ptr<Region> region() const;  // throws when closed

 private:
  void check_index(size_t index) const;

  size_t block_bytes_;
  size_t num_blocks_;
  mutable std::mutex mu_;
  std::shared_ptr<Region> region_;
  std::vector<uint32_t> free_list_;
  std::vector<uint8_t> in_use_;
};

}  // namespace cachedattn
