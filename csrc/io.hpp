// Input shards (read with pread, or mapped read-only for the kernels: see mapped.hpp) and output
// shards (O_EXCL, preallocated, pwrite and copy_file_range). No Python here; everything throws
// lsf::CoreErr.
#pragma once

#include <sys/types.h>

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>

#include "common.hpp"
#include "mapped.hpp"

namespace lsf {

constexpr uint64_t kMaxHeaderBytes = 100000000ULL;

// A file descriptor shared by concurrent users. close() waits until nobody uses the fd any more,
// so a descriptor is never closed (and its number reused) under a running pread/pwrite.
class FdHolder {
 public:
  void set(int fd);
  // The fd, or -1 when it is closed; on success the caller must call release().
  int acquire();
  void release();
  // Wait for all users, then hand back the fd (or -1) and mark the holder closed.
  int take();
  // Wait for all users, then run fn(fd) (fd -1 when closed) with no new user let in meanwhile.
  template <class F>
  void exclusive(F&& fn) {
    std::unique_lock<std::mutex> g(m_);
    cv_.wait(g, [this] { return users_ == 0; });
    fn(fd_);
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int fd_ = -1;
  long users_ = 0;
};

// RAII use of an FdHolder; throws CoreErr("<what>: <path> is closed") when closed.
class FdUse {
 public:
  FdUse(FdHolder& h, const std::string& path, const char* what);
  ~FdUse();
  FdUse(const FdUse&) = delete;
  FdUse& operator=(const FdUse&) = delete;
  int fd() const { return fd_; }

 private:
  FdHolder* h_;
  int fd_;
};

class InputFile;

// Where a tensor's elements start: a byte offset into an input file.
struct FileSlice {
  InputFile* file;
  uint64_t offset;
};

class InputFile {
 public:
  // Auto maps the file unless it lies on a network or FUSE filesystem (see resolve_io_mode).
  explicit InputFile(const std::string& path, IoMode io = IoMode::Auto);
  ~InputFile();
  InputFile(const InputFile&) = delete;
  InputFile& operator=(const InputFile&) = delete;

  const std::string& path() const { return path_; }
  uint64_t size() const { return size_; }
  FdHolder& holder() { return fd_; }

  // CoreErr unless [off, off + n) lies inside [0, size()).
  void check_range(uint64_t off, uint64_t n, const char* what) const;
  // Bounds-checked read of exactly n bytes at off.
  void read(uint64_t off, void* buf, uint64_t n);
  // Read exactly n bytes at off through an fd already in use (no bounds check); a short read
  // means the file shrank after it was opened: CoreErr "... truncated ...".
  void pread_exact(int fd, uint64_t off, void* buf, uint64_t n) const;
  // Validated safetensors header length N (bytes 8 .. 8 + N hold the JSON).
  uint64_t header_length();
  void check_unchanged();
  void close();

  // Mmap or Pread: how the kernels read this file now.
  IoMode io() const { return map_ ? IoMode::Mmap : IoMode::Pread; }
  // Map (Mmap, or Auto where that resolves to it) or unmap (Pread) the file, once no kernel uses
  // it. A file that cannot be mapped (empty, the mapping registry full, mmap refused) stays on
  // pread. CoreErr when closed.
  void set_io(IoMode io);
  // The read-only mapping of the whole file (size() bytes), or null. Only stable while the caller
  // holds a use of holder().
  const unsigned char* map() const { return map_; }
  // The file's size now (fstat), or -1 when that cannot be known (closed, fstat failed).
  int64_t current_size();

 private:
  void map_locked(int fd, IoMode io);
  void unmap_locked();

  std::string path_;
  uint64_t size_ = 0;
  dev_t dev_ = 0;
  ino_t ino_ = 0;
  FdHolder fd_;
  const unsigned char* map_ = nullptr;  // changed only with no user of fd_ (exclusive / take)
};

// Global switch for tests: false forces copy_range onto the pread/pwrite fallback.
void set_copy_file_range_enabled(bool enabled);
// Global switch for tests: at most n bytes per pread/pwrite/copy_file_range call (0: the
// default), so that reads and writes come back short and every retry loop runs.
void set_max_io_bytes(uint64_t n);

class ShardWriter {
 public:
  // reserve: allocate every block up front (posix_fallocate); false leaves a sparse file, for an
  // output whose copies will be clones of its inputs' blocks
  ShardWriter(const std::string& path, uint64_t size, bool reserve = true);
  ~ShardWriter();
  ShardWriter(const ShardWriter&) = delete;
  ShardWriter& operator=(const ShardWriter&) = delete;

  const std::string& path() const { return path_; }
  uint64_t size() const { return size_; }
  FdHolder& holder() { return fd_; }

  void check_range(uint64_t off, uint64_t n, const char* what) const;
  void write(uint64_t off, const void* data, uint64_t n);
  // Write exactly n bytes at off through an fd already in use (no bounds check).
  void pwrite_exact(int fd, uint64_t off, const void* buf, uint64_t n) const;
  void copy_range(InputFile& src, uint64_t src_off, uint64_t dst_off, uint64_t n);
  // Start writing [off, off+n) back to the disk (sync_file_range); with wait, also wait until it
  // is written; with drop, then evict those clean pages from the page cache (posix_fadvise).
  void writeback(uint64_t off, uint64_t n, bool wait, bool drop);
  void close(bool sync);
  void abort() noexcept;

 private:
  enum class State { Open, Closed, Aborted };
  std::string path_;
  uint64_t size_ = 0;
  dev_t dev_ = 0;
  ino_t ino_ = 0;
  FdHolder fd_;
  std::mutex state_m_;
  // Buffered writes to one file are serialised by the kernel (the inode's lock), where a waiting
  // writer spins while the other copies into the page cache: waiting here sleeps instead, and
  // leaves the core to the hashing and blending threads.
  mutable std::mutex write_m_;
  State state_ = State::Open;
};

}  // namespace lsf
