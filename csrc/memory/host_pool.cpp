#include "memory/host_pool.h"

#include <sys/mman.h>

#include <cerrno>
#include <cstdio>
#include <stdexcept>

#include "common/errors.h"
#include "cuda/cuda_api.h"

namespace cachedattn {

namespace {
constexpr size_t kHugePage = 2u << 20;

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

std::string hex(uintptr_t v) {
  char buf[24];
  snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}
}  // namespace

std::atomic<int64_t> Region::live_{0};

Region::Region(size_t bytes, HugePages mode, bool register_cuda) : bytes_(bytes) {
  if (bytes == 0) throw std::invalid_argument("host region size must be positive");
  void* p = MAP_FAILED;
  if (mode != HugePages::Off) {
    mapped_bytes_ = round_up(bytes, kHugePage);
    p = mmap(nullptr, mapped_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
    if (p != MAP_FAILED) {
      page_kind_ = "hugetlb";
    } else if (mode == HugePages::On) {
      throw_errno(errno,
                  "cannot map " + std::to_string(mapped_bytes_) +
                      " bytes of huge pages (reserve them in /proc/sys/vm/nr_hugepages, or use hugepages='auto')");
    }
  }
  if (p == MAP_FAILED) {
    mapped_bytes_ = round_up(bytes, HostPool::kAlign);
    p = mmap(nullptr, mapped_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw_errno(errno, "cannot map " + std::to_string(mapped_bytes_) + " bytes of host memory");
    // Transparent huge pages still cut TLB misses on large sequential copies.
    page_kind_ = (mode != HugePages::Off && madvise(p, mapped_bytes_, MADV_HUGEPAGE) == 0) ? "thp" : "4k";
  }
  base_ = static_cast<char*>(p);
  if (register_cuda) {
    try {
      cuda::host_register(base_, mapped_bytes_);
    } catch (...) {
      munmap(base_, mapped_bytes_);
      throw;
    }
    cuda_registered_ = true;
  }
  live_.fetch_add(1);
}

Region::~Region() {
  if (cuda_registered_) cuda::host_unregister(base_);
  munmap(base_, mapped_bytes_);
  live_.fetch_sub(1);
}

HostPool::HostPool(size_t capacity_bytes, size_t block_bytes, HugePages mode, bool register_cuda)
    : block_bytes_(block_bytes) {
  if (block_bytes == 0 || block_bytes % kAlign != 0)
    throw std::invalid_argument("block_bytes must be a positive multiple of 4096 (O_DIRECT alignment), got " +
                                std::to_string(block_bytes));
  if (capacity_bytes < block_bytes)
    throw std::invalid_argument("capacity_bytes (" + std::to_string(capacity_bytes) + ") is smaller than one block (" +
                                std::to_string(block_bytes) + ")");
  num_blocks_ = capacity_bytes / block_bytes;
  if (num_blocks_ > UINT32_MAX) throw std::invalid_argument("too many blocks: use larger blocks");
  region_ = std::make_shared<Region>(num_blocks_ * block_bytes, mode, register_cuda);
  free_list_.reserve(num_blocks_);
  // Hand out low addresses first: reused blocks stay warm in the TLB and caches.
  for (size_t i = num_blocks_; i-- > 0;) free_list_.push_back(static_cast<uint32_t>(i));
  in_use_.assign(num_blocks_, 0);
}

std::optional<size_t> HostPool::alloc() {
  std::lock_guard<std::mutex> lock(mu_);
  if (!region_) throw std::invalid_argument("host pool is closed");
  if (free_list_.empty()) return std::nullopt;
  size_t i = free_list_.back();
  free_list_.pop_back();
  in_use_[i] = 1;
  return i;
}

void HostPool::check_index(size_t index) const {
  if (index >= num_blocks_)
    throw std::invalid_argument("block index " + std::to_string(index) + " is out of range (pool has " +
                                std::to_string(num_blocks_) + " blocks)");
}

void HostPool::free(size_t index) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!region_) throw std::invalid_argument("host pool is closed");
  check_index(index);
  if (!in_use_[index]) throw std::invalid_argument("double free of block " + std::to_string(index));
  in_use_[index] = 0;
  free_list_.push_back(static_cast<uint32_t>(index));
}

size_t HostPool::index_of(uintptr_t address) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (!region_) throw std::invalid_argument("host pool is closed");
  auto base = reinterpret_cast<uintptr_t>(region_->base());
  if (address < base || address >= base + num_blocks_ * block_bytes_ || (address - base) % block_bytes_ != 0)
    throw std::invalid_argument("address " + hex(address) + " is not the start of a block of this pool");
  return (address - base) / block_bytes_;
}

uintptr_t HostPool::address_of(size_t index) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (!region_) throw std::invalid_argument("host pool is closed");
  check_index(index);
  return reinterpret_cast<uintptr_t>(region_->base()) + index * block_bytes_;
}

size_t HostPool::num_free() const {
  std::lock_guard<std::mutex> lock(mu_);
  return free_list_.size();
}

bool HostPool::closed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return !region_;
}

void HostPool::close() {
  std::shared_ptr<Region> last;
  {
    std::lock_guard<std::mutex> lock(mu_);
    last.swap(region_);
  }
  // `last` may unmap here, outside the lock.
}

std::shared_ptr<Region> HostPool::region() const {
  std::lock_guard<std::mutex> lock(mu_);
  if (!region_) throw std::invalid_argument("host pool is closed");
  return region_;
}

}  // namespace cachedattn
