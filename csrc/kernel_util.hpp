// Helpers shared by the kernels (kernels.cpp, ties*.cpp, chunk_reader.cpp): element access by
// dtype, the per-call thread pool and pooled scratch buffers.
#pragma once

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "common.hpp"
#include "numerics.hpp"

#define LSF_INLINE inline __attribute__((always_inline))

// The hot loops get AVX-512 (x86-64-v4) and AVX2 clones picked at load time (GNU ifunc); every
// clone does the same IEEE float32 operations (no FMA: -ffp-contract=off), so results do not
// depend on the CPU. Define LSF_DISABLE_TARGET_CLONES to build the baseline only.
#ifndef LSF_DISABLE_TARGET_CLONES
#define LSF_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define LSF_CLONES
#endif

#if defined(__x86_64__) && defined(__GNUC__)
// Hand-written AVX-512 forms (TIES' BF16 merge, the mergekit programs' masks) are compiled for
// these features and taken only where cpu_has_avx512() says the CPU has them.
#define LSF_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#endif

namespace lsf {

#if defined(__x86_64__) && defined(__GNUC__)
inline bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return has;
}
#endif

// ---- element access ----------------------------------------------------------------------------

template <DType D>
struct Elem;

template <>
struct Elem<DType::BF16> {
  static LSF_INLINE float load(const unsigned char* p, size_t j) {
    uint16_t h;
    std::memcpy(&h, p + 2 * j, 2);
    return bf16_to_f32(h);
  }
  static LSF_INLINE void store(unsigned char* p, size_t j, float f) {
    uint16_t h = f32_to_bf16(f);
    std::memcpy(p + 2 * j, &h, 2);
  }
};

template <>
struct Elem<DType::F16> {
  static LSF_INLINE float load(const unsigned char* p, size_t j) {
    uint16_t h;
    std::memcpy(&h, p + 2 * j, 2);
    return f16_to_f32(h);
  }
  static LSF_INLINE void store(unsigned char* p, size_t j, float f) {
    uint16_t h = f32_to_f16(f);
    std::memcpy(p + 2 * j, &h, 2);
  }
};

template <>
struct Elem<DType::F32> {
  static LSF_INLINE float load(const unsigned char* p, size_t j) {
    float f;
    std::memcpy(&f, p + 4 * j, 4);
    return f;
  }
  static LSF_INLINE void store(unsigned char* p, size_t j, float f) { std::memcpy(p + 4 * j, &f, 4); }
};

// dst[j] = float32 value of element j of p, for m elements.
template <DType D>
LSF_INLINE void pass_to_f32(float* __restrict dst, const unsigned char* __restrict p, size_t m) {
  for (size_t j = 0; j < m; ++j) dst[j] = Elem<D>::load(p, j);
}

// Kernels that read their inputs a page or less at a time, input after input (row MAVs, the
// mergekit programs), leave the hardware prefetcher, which stops at every 4 KiB page, restarting
// all the time: their loops ask for each input's cache line this far ahead themselves (written
// out in each loop: through a lambda they measured slower). Prefetches never fault, past a
// mapping's end either.
constexpr size_t kAhead = 4096;  // bytes
template <DType D>
constexpr size_t kElemBytes = D == DType::F32 ? 4 : 2;

template <DType D>
LSF_INLINE void pass_to_f32_ahead(float* __restrict dst, const unsigned char* __restrict p, size_t m) {
  constexpr size_t esz = kElemBytes<D>;
  constexpr size_t per_line = 64 / esz;
  size_t j = 0;
  for (; j + per_line <= m; j += per_line) {
    __builtin_prefetch(p + j * esz + kAhead);
    for (size_t i = 0; i < per_line; ++i) dst[j + i] = Elem<D>::load(p, j + i);
  }
  for (; j < m; ++j) dst[j] = Elem<D>::load(p, j);
}

// ---- dtype dispatch ------------------------------------------------------------------------------

// Runs the statements with D a constexpr DType equal to dt (one of the float dtypes the kernels
// take; any other value, never passed after validation, runs as F32).
#define LSF_DTYPE_DISPATCH(dt, D, ...)   \
  switch (dt) {                          \
    case DType::BF16: {                  \
      constexpr DType D = DType::BF16;   \
      __VA_ARGS__;                       \
      break;                             \
    }                                    \
    case DType::F16: {                   \
      constexpr DType D = DType::F16;    \
      __VA_ARGS__;                       \
      break;                             \
    }                                    \
    default: {                           \
      constexpr DType D = DType::F32;    \
      __VA_ARGS__;                       \
      break;                             \
    }                                    \
  }

// ---- thread pool -------------------------------------------------------------------------------

class TaskQueue {
 public:
  explicit TaskQueue(uint64_t n) : n_(n) {}
  bool pop(uint64_t* t) {
    if (stop_.load(std::memory_order_relaxed)) return false;
    *t = next_.fetch_add(1, std::memory_order_relaxed);
    return *t < n_;
  }
  void stop() { stop_.store(true, std::memory_order_relaxed); }

 private:
  uint64_t n_;
  std::atomic<uint64_t> next_{0};
  std::atomic<bool> stop_{false};
};

// Run worker(queue) on `nthreads` threads (the caller is one of them). The first exception of any
// worker stops the others from taking new tasks and is rethrown after all threads have joined.
template <class Worker>
void run_pool(size_t nthreads, uint64_t ntasks, Worker&& worker) {
  TaskQueue queue(ntasks);
  std::mutex err_m;
  std::exception_ptr first;
  auto body = [&]() {
    try {
      worker(queue);
    } catch (...) {
      std::lock_guard<std::mutex> g(err_m);
      if (!first) first = std::current_exception();
      queue.stop();
    }
  };
  std::vector<std::thread> pool;
  try {
    pool.reserve(nthreads > 0 ? nthreads - 1 : 0);
    for (size_t i = 1; i < nthreads; ++i) pool.emplace_back(body);
  } catch (...) {
    // Could not start more threads: the ones running (and this one) do all the work.
  }
  body();
  for (auto& t : pool) t.join();
  if (first) std::rethrow_exception(first);
}

// ---- scratch buffers -----------------------------------------------------------------------------

// Buffers freed by one call, kept for the next: malloc hands large blocks back to the kernel on
// free, and faulting in fresh pages for the chunk buffers and histograms of every tensor cost
// more than the kernels spend on a tensor of a few million elements. Only blocks of at least
// kPoolMin bytes are kept, at most kPoolMax bytes of them (the oldest go first), and a block is
// reused only for a request of exactly its size (the sizes repeat from tensor to tensor). The
// pool is never destroyed: a call still running in another thread at exit may give back to it.
inline constexpr uint64_t kPoolMin = 64ULL << 10;
inline constexpr uint64_t kPoolMax = 32ULL << 20;
inline constexpr std::align_val_t kAlign{64};

class BufPool {
 public:
  static BufPool& get() {
    static BufPool* pool = new BufPool;
    return *pool;
  }
  void* take(uint64_t bytes) {
    if (bytes >= kPoolMin) {
      std::lock_guard<std::mutex> g(m_);
      for (size_t i = free_.size(); i-- > 0;) {
        if (free_[i].bytes != bytes) continue;
        void* p = free_[i].p;
        free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
        held_ -= bytes;
        return p;
      }
    }
    return ::operator new(static_cast<size_t>(bytes), kAlign);  // may throw std::bad_alloc
  }
  void give(void* p, uint64_t bytes) noexcept {
    if (bytes >= kPoolMin && bytes <= kPoolMax) {
      std::lock_guard<std::mutex> g(m_);
      try {
        free_.push_back(Block{p, bytes});
        held_ += bytes;
        p = nullptr;
      } catch (...) {  // no room in the list: just free it
      }
      while (held_ > kPoolMax) {
        ::operator delete(free_.front().p, kAlign);
        held_ -= free_.front().bytes;
        free_.erase(free_.begin());
      }
    }
    if (p) ::operator delete(p, kAlign);
  }

 private:
  struct Block {
    void* p;
    uint64_t bytes;
  };
  BufPool() = default;
  std::mutex m_;
  std::vector<Block> free_;
  uint64_t held_ = 0;
};

struct PoolFree {
  uint64_t bytes = 0;
  void operator()(void* p) const noexcept { BufPool::get().give(p, bytes); }
};

// An uninitialised array of a trivial type, its memory from BufPool.
template <class T>
using Array = std::unique_ptr<T[], PoolFree>;

template <class T>
Array<T> alloc_array(uint64_t n, const char* what) {
  static_assert(std::is_trivial<T>::value && alignof(T) <= 64, "plain data only");
  uint64_t bytes;
  if (!mul_ok(n, sizeof(T), &bytes) || bytes > static_cast<uint64_t>(PTRDIFF_MAX))
    fail_os(ENOMEM, std::string("allocating ") + std::to_string(n) + " x " +
                        std::to_string(sizeof(T)) + " bytes for " + what);
  try {
    return Array<T>(static_cast<T*>(BufPool::get().take(bytes)), PoolFree{bytes});
  } catch (const std::bad_alloc&) {
    fail_nomem(bytes, what);
  }
}

}  // namespace lsf
