#include "io.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <new>
#include <vector>

namespace lsf {

namespace {

constexpr uint64_t kMaxIo = 1ULL << 30;             // bytes per pread/pwrite/copy_file_range call
constexpr uint64_t kCopyBuffer = 8ULL << 20;        // fallback copy buffer
constexpr uint64_t kMaxOff = static_cast<uint64_t>(INT64_MAX);

std::atomic<bool> g_cfr_enabled{true};
std::atomic<uint64_t> g_max_io{kMaxIo};  // lowered by a test hook so that every retry loop runs

// Bytes to ask of one pread/pwrite/copy_file_range call when n are left.
uint64_t io_request(uint64_t n) { return std::min(n, g_max_io.load(std::memory_order_relaxed)); }

std::string q(const std::string& path) { return show(path); }

void close_quietly(int fd) {
  if (fd >= 0) ::close(fd);
}

// CoreErr unless [off, off + n) lies inside a file of `size` bytes.
void check_file_range(const std::string& path, uint64_t size, uint64_t off, uint64_t n,
                      const char* what) {
  if (!range_ok(off, n, size))
    fail(std::string(what) + " " + q(path) + ": range [" + std::to_string(off) + ", " +
         std::to_string(off) + " + " + std::to_string(n) + ") is outside the file (" +
         std::to_string(size) + " bytes)");
}

// A read of n bytes at off found the end of the file after `done` bytes.
[[noreturn]] void fail_truncated(const std::string& path, uint64_t size, uint64_t off, uint64_t n,
                                 uint64_t done) {
  fail("input changed during the merge: " + q(path) + " was truncated while in use: expected " + std::to_string(n) +
       " bytes at offset " + std::to_string(off) + " but the file ends at " +
       std::to_string(off + done) + " (it had " + std::to_string(size) + " bytes when opened)");
}

}  // namespace

// ---- FdHolder ----------------------------------------------------------------------------------

void FdHolder::set(int fd) {
  std::lock_guard<std::mutex> g(m_);
  fd_ = fd;
}

int FdHolder::acquire() {
  std::lock_guard<std::mutex> g(m_);
  if (fd_ < 0) return -1;
  ++users_;
  return fd_;
}

void FdHolder::release() {
  std::lock_guard<std::mutex> g(m_);
  if (--users_ == 0) cv_.notify_all();
}

int FdHolder::take() {
  std::unique_lock<std::mutex> g(m_);
  int fd = fd_;
  fd_ = -1;  // no new users from now on
  cv_.wait(g, [this] { return users_ == 0; });
  return fd;
}

FdUse::FdUse(FdHolder& h, const std::string& path, const char* what) : h_(&h), fd_(h.acquire()) {
  if (fd_ < 0) fail(std::string(what) + ": " + q(path) + " is closed");
}

FdUse::~FdUse() { h_->release(); }

// ---- InputFile ---------------------------------------------------------------------------------

InputFile::InputFile(const std::string& path, IoMode io) : path_(path) {
  if (path.find('\0') != std::string::npos) fail("opening " + q(path) + ": path contains a NUL byte");
  int fd;
  do {
    fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) fail_os(errno, "opening " + q(path));
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int e = errno;
    close_quietly(fd);
    fail_os(e, "stat " + q(path));
  }
  if (!S_ISREG(st.st_mode)) {
    close_quietly(fd);
    fail("opening " + q(path) + ": not a regular file");
  }
  size_ = static_cast<uint64_t>(st.st_size);
  dev_ = st.st_dev;
  ino_ = st.st_ino;
  map_locked(fd, io);  // nobody else can see this file yet
  fd_.set(fd);
}

InputFile::~InputFile() { close(); }

void InputFile::map_locked(int fd, IoMode io) {
  if (map_ || size_ == 0 || resolve_io_mode(io, fd) != IoMode::Mmap) return;
  if (size_ > static_cast<uint64_t>(SIZE_MAX)) return;
  void* p = ::mmap(nullptr, static_cast<size_t>(size_), PROT_READ, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return;  // e.g. out of address space: pread still works
  if (!register_mapping(p, size_, this)) {
    ::munmap(p, static_cast<size_t>(size_));
    return;
  }
  // Advice only. The kernels read each input front to back once per pass: a larger readahead
  // window on faults, and pages that need not stay mapped (ChunkReader also drops its chunks'
  // pages from our page tables behind it, so mapped inputs do not pile up in the RSS).
  (void)::madvise(p, static_cast<size_t>(size_), MADV_SEQUENTIAL);
  map_ = static_cast<const unsigned char*>(p);
}

void InputFile::unmap_locked() {
  if (!map_) return;
  unregister_mapping(map_);
  ::munmap(const_cast<unsigned char*>(map_), static_cast<size_t>(size_));
  map_ = nullptr;
}

void InputFile::set_io(IoMode io) {
  bool closed = false;
  fd_.exclusive([&](int fd) {
    if (fd < 0) {
      closed = true;
    } else if (io == IoMode::Pread) {
      unmap_locked();
    } else {
      map_locked(fd, io);
    }
  });
  if (closed) fail("setting the read path of " + q(path_) + ": the file is closed");
}

int64_t InputFile::current_size() {
  int fd = fd_.acquire();
  if (fd < 0) return -1;
  struct stat st;
  const int rc = ::fstat(fd, &st);
  fd_.release();
  return rc == 0 ? static_cast<int64_t>(st.st_size) : -1;
}

void InputFile::check_range(uint64_t off, uint64_t n, const char* what) const {
  check_file_range(path_, size_, off, n, what);
}

void InputFile::pread_exact(int fd, uint64_t off, void* buf, uint64_t n) const {
  auto* p = static_cast<unsigned char*>(buf);
  uint64_t done = 0;
  while (done < n) {
    size_t req = static_cast<size_t>(io_request(n - done));
    ssize_t r = ::pread(fd, p + done, req, static_cast<off_t>(off + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      fail_os(errno, "reading " + q(path_) + " (" + std::to_string(n) + " bytes at offset " +
                         std::to_string(off) + ")");
    }
    if (r == 0) fail_truncated(path_, size_, off, n, done);
    done += static_cast<uint64_t>(r);
  }
}

void InputFile::read(uint64_t off, void* buf, uint64_t n) {
  check_range(off, n, "reading");
  FdUse use(fd_, path_, "reading");
  pread_exact(use.fd(), off, buf, n);
}

uint64_t InputFile::header_length() {
  if (size_ < 8)
    fail("reading header of " + q(path_) + ": file has " + std::to_string(size_) +
         " bytes, too short for a safetensors file (needs at least 8)");
  unsigned char b[8];
  read(0, b, 8);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | b[i];
  if (n == 0) fail("reading header of " + q(path_) + ": header length is 0");
  if (n > kMaxHeaderBytes)
    fail("reading header of " + q(path_) + ": header length " + std::to_string(n) +
         " exceeds the limit of " + std::to_string(kMaxHeaderBytes) + " bytes");
  if (n > size_ - 8)
    fail("reading header of " + q(path_) + ": header length " + std::to_string(n) +
         " runs past the end of the file (" + std::to_string(size_) + " bytes)");
  return n;
}

void InputFile::check_unchanged() {
  FdUse use(fd_, path_, "checking");
  struct stat st;
  if (::fstat(use.fd(), &st) != 0) fail_os(errno, "stat " + q(path_));
  if (static_cast<uint64_t>(st.st_size) < size_)
    fail(q(path_) + " was truncated while in use: it now has " + std::to_string(st.st_size) +
         " bytes, " + std::to_string(size_) + " when opened");
  struct stat ps;
  if (::stat(path_.c_str(), &ps) != 0) {
    int e = errno;
    fail_os(e, q(path_) + " was removed or replaced while in use");
  }
  if (ps.st_dev != dev_ || ps.st_ino != ino_)
    fail(q(path_) + " was replaced while in use: the path now names another file");
}

void InputFile::close() {
  const int fd = fd_.take();  // no kernel reads the mapping any more
  unmap_locked();
  close_quietly(fd);
}

// ---- ShardWriter -------------------------------------------------------------------------------

void set_copy_file_range_enabled(bool enabled) { g_cfr_enabled.store(enabled); }

void set_max_io_bytes(uint64_t n) { g_max_io.store(n == 0 ? kMaxIo : std::min(n, kMaxIo)); }

ShardWriter::ShardWriter(const std::string& path, uint64_t size, bool reserve) : path_(path), size_(size) {
  if (path.find('\0') != std::string::npos) fail("creating " + q(path) + ": path contains a NUL byte");
  if (size > kMaxOff)
    fail("creating " + q(path) + ": size " + std::to_string(size) + " is too large");
  int fd;
  do {
    fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) fail_os(errno, "creating " + q(path));
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int e = errno;
    close_quietly(fd);
    ::unlink(path.c_str());
    fail_os(e, "stat " + q(path));
  }
  dev_ = st.st_dev;
  ino_ = st.st_ino;
  if (size > 0) {
    int rc;
    do {
      rc = reserve ? ::posix_fallocate(fd, 0, static_cast<off_t>(size)) : EOPNOTSUPP;
    } while (rc == EINTR);
    if (rc == EOPNOTSUPP || rc == EINVAL || rc == ENOSYS) {
      // The file system cannot reserve space: just set the size (sparse file).
      rc = ::ftruncate(fd, static_cast<off_t>(size)) == 0 ? 0 : errno;
    }
    if (rc != 0) {
      close_quietly(fd);
      ::unlink(path.c_str());
      fail_os(rc, "reserving " + std::to_string(size) + " bytes for " + q(path));
    }
  }
  fd_.set(fd);
}

ShardWriter::~ShardWriter() {
  // Dropped without close() or abort(): release the descriptor, keep the file.
  close_quietly(fd_.take());
}

void ShardWriter::check_range(uint64_t off, uint64_t n, const char* what) const {
  check_file_range(path_, size_, off, n, what);
}

void ShardWriter::pwrite_exact(int fd, uint64_t off, const void* buf, uint64_t n) const {
  const auto* p = static_cast<const unsigned char*>(buf);
  uint64_t done = 0;
  while (done < n) {
    size_t req = static_cast<size_t>(io_request(n - done));
    ssize_t r;
    {
      std::lock_guard<std::mutex> one_writer(write_m_);
      r = ::pwrite(fd, p + done, req, static_cast<off_t>(off + done));
    }
    if (r < 0) {
      if (errno == EINTR) continue;
      fail_os(errno, "writing " + q(path_) + " (needed " + std::to_string(n - done) +
                         " bytes at offset " + std::to_string(off + done) + ")");
    }
    if (r == 0)
      fail_os(EIO, "writing " + q(path_) + ": no progress at offset " +
                       std::to_string(off + done));
    done += static_cast<uint64_t>(r);
  }
}

void ShardWriter::write(uint64_t off, const void* data, uint64_t n) {
  check_range(off, n, "writing");
  FdUse use(fd_, path_, "writing");
  pwrite_exact(use.fd(), off, data, n);
}

void ShardWriter::copy_range(InputFile& src, uint64_t src_off, uint64_t dst_off, uint64_t n) {
  src.check_range(src_off, n, "copying from");
  check_range(dst_off, n, "copying to");
  FdUse in(src.holder(), src.path(), "copying from");
  FdUse out(fd_, path_, "copying to");
  uint64_t done = 0;
  if (g_cfr_enabled.load()) {
    while (done < n) {
      loff_t so = static_cast<loff_t>(src_off + done);
      loff_t dof = static_cast<loff_t>(dst_off + done);
      size_t req = static_cast<size_t>(io_request(n - done));
      ssize_t r = ::copy_file_range(in.fd(), &so, out.fd(), &dof, req, 0);
      if (r < 0) {
        int e = errno;
        if (e == EINTR) continue;
        if (e == EXDEV || e == ENOSYS || e == EINVAL || e == EOPNOTSUPP || e == ENOTSUP ||
            e == EBADF || e == ETXTBSY || e == EPERM)
          break;  // the kernel refuses: finish with pread/pwrite
        fail_os(e, "copying " + std::to_string(n) + " bytes from " + q(src.path()) + " (offset " +
                       std::to_string(src_off) + ") to " + q(path_) + " (offset " +
                       std::to_string(dst_off) + ")");
      }
      if (r == 0) fail_truncated(src.path(), src.size(), src_off, n, done);
      done += static_cast<uint64_t>(r);
    }
  }
  if (done == n) return;
  uint64_t bufsize = std::min(n - done, kCopyBuffer);
  std::unique_ptr<unsigned char[]> buf;
  try {
    buf.reset(new unsigned char[bufsize]);
  } catch (const std::bad_alloc&) {
    fail_nomem(bufsize, "the copy buffer");
  }
  while (done < n) {
    uint64_t m = std::min(n - done, bufsize);
    src.pread_exact(in.fd(), src_off + done, buf.get(), m);
    pwrite_exact(out.fd(), dst_off + done, buf.get(), m);
    done += m;
  }
}

void ShardWriter::writeback(uint64_t off, uint64_t n, bool wait, bool drop) {
  check_range(off, n, "writing back");
  if (n == 0) return;
  FdUse use(fd_, path_, "writing back");
  unsigned flags = SYNC_FILE_RANGE_WRITE;
  if (wait) flags |= SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WAIT_AFTER;
  int rc;
  do {
    rc = ::sync_file_range(use.fd(), static_cast<off64_t>(off), static_cast<off64_t>(n), flags);
  } while (rc != 0 && errno == EINTR);
  if (rc != 0) fail_os(errno, "writing back " + q(path_));
  // Advice only: the pages stay cached if the kernel cannot drop them, which is harmless.
  if (drop) (void)::posix_fadvise(use.fd(), static_cast<off_t>(off), static_cast<off_t>(n), POSIX_FADV_DONTNEED);
}

void ShardWriter::close(bool sync) {
  int fd = fd_.take();
  if (fd < 0) return;
  {
    std::lock_guard<std::mutex> g(state_m_);
    if (state_ == State::Open) state_ = State::Closed;
  }
  if (sync) {
    int rc;
    do {
      rc = ::fsync(fd);
    } while (rc != 0 && errno == EINTR);
    if (rc != 0) {
      int e = errno;
      ::close(fd);
      fail_os(e, "fsync " + q(path_));
    }
  }
  if (::close(fd) != 0 && errno != EINTR) fail_os(errno, "closing " + q(path_));
}

void ShardWriter::abort() noexcept {
  try {
    close_quietly(fd_.take());
    {
      std::lock_guard<std::mutex> g(state_m_);
      if (state_ == State::Aborted) return;
      state_ = State::Aborted;
    }
    // Remove the file only if the path still names the file this writer created.
    struct stat st;
    if (::lstat(path_.c_str(), &st) == 0 && st.st_dev == dev_ && st.st_ino == ino_)
      ::unlink(path_.c_str());
  } catch (...) {
  }
}

}  // namespace lsf
