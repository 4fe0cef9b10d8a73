// Containers whose large blocks bypass malloc. Freeing a block that glibc had mmapped raises its
// mmap and trim thresholds for the whole process (up to 32 and 64 MiB): after that no thread's
// heap gives its free top back to the OS, and the JIT's compiler threads keep MiBs of freed
// memory that the OS counts against what a merge gave back. Blocks of kBigBlock bytes or more
// are mapped and unmapped here instead; smaller ones go to malloc as usual.
#pragma once
#include <sys/mman.h>

#include <cstddef>
#include <cstdlib>
#include <new>
#include <unordered_map>
#include <vector>

namespace pm {

constexpr size_t kBigBlock = 64 * 1024;  // below glibc's smallest mmap threshold (128 KiB)

template <class T>
struct BigAllocator {
  using value_type = T;
  BigAllocator() noexcept = default;
  template <class U>
  BigAllocator(const BigAllocator<U>&) noexcept {}

  T* allocate(size_t n) {
    const size_t bytes = n * sizeof(T);
    void* p = bytes < kBigBlock ? std::malloc(bytes) : mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == nullptr || p == MAP_FAILED) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t n) noexcept {
    const size_t bytes = n * sizeof(T);
    if (bytes < kBigBlock) std::free(p);
    else munmap(p, bytes);
  }
};
template <class T, class U>
bool operator==(const BigAllocator<T>&, const BigAllocator<U>&) noexcept { return true; }
template <class T, class U>
bool operator!=(const BigAllocator<T>&, const BigAllocator<U>&) noexcept { return false; }

// n uninitialized T's from BigAllocator: a large block's pages are touched only as they are used.
template <class T>
class BigBlock {
 public:
  explicit BigBlock(size_t n) : n_(n), p_(BigAllocator<T>().allocate(n)) {}
  ~BigBlock() { BigAllocator<T>().deallocate(p_, n_); }
  BigBlock(const BigBlock&) = delete;
  BigBlock& operator=(const BigBlock&) = delete;
  T* get() const { return p_; }

 private:
  size_t n_;
  T* p_;
};

template <class T>
using Vec = std::vector<T, BigAllocator<T>>;
template <class K, class V>
using HashMap = std::unordered_map<K, V, std::hash<K>, std::equal_to<K>, BigAllocator<std::pair<const K, V>>>;

}  // namespace pm
