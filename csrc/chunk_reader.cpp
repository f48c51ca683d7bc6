#include "chunk_reader.hpp"

#include <algorithm>

#include <sys/mman.h>
#include <unistd.h>

namespace lsf {

void check_slice(const FileSlice& s, uint64_t numel, DType dt, const std::string& role) {
  uint64_t bytes;
  if (!mul_ok(numel, dtype_size(dt), &bytes))
    fail(role + ": " + std::to_string(numel) + " elements of " + dtype_name(dt) +
         " overflow a 64-bit size");
  if (!range_ok(s.offset, bytes, s.file->size()))
    fail(role + ": " + std::to_string(numel) + " elements of " + dtype_name(dt) + " (" +
         std::to_string(bytes) + " bytes) at offset " + std::to_string(s.offset) +
         " run past the end of " + show(s.file->path()) + " (" + std::to_string(s.file->size()) +
         " bytes)");
}

void check_slices(const std::vector<FileSlice>& s, const std::vector<DType>& dt, uint64_t numel,
                  const std::string& role) {
  for (size_t i = 0; i < s.size(); ++i)
    check_slice(s[i], numel, dt[i], role + "[" + std::to_string(i) + "]");
}

void check_out_slice(const ShardWriter& out, uint64_t off, uint64_t numel, DType dt,
                     const std::string& fn) {
  uint64_t bytes;
  if (!mul_ok(numel, dtype_size(dt), &bytes))
    fail(fn + ": numel " + std::to_string(numel) + " overflows a 64-bit size");
  out.check_range(off, bytes, (fn + ": writing").c_str());
}

// ---- StreamFiles ---------------------------------------------------------------------------------

StreamFiles::StreamFiles(const std::string& fn, const FileSlice* base, DType base_dt,
                         const std::vector<FileSlice>& in, const std::vector<DType>& in_dt,
                         ShardWriter* out, uint64_t out_offset, DType out_dt)
    : buffers_(fn + " chunk buffers"), out_(out), out_offset_(out_offset), out_dt_(out_dt) {
  if (base) {
    in_.push_back(*base);
    dt_.push_back(base_dt);
  }
  in_.insert(in_.end(), in.begin(), in.end());
  dt_.insert(dt_.end(), in_dt.begin(), in_dt.end());
  const std::string reading = fn + ": reading";
  bool any_mapped = false;
  for (size_t i = 0; i < in_.size(); ++i) {
    const FileSlice& s = in_[i];
    fds_.push_back(hold(s.file->holder(), s.file->path(), reading));
    // Read only now that we hold the file: set_io and close wait for us before they unmap.
    const unsigned char* m = s.file->map();
    maps_.push_back(m ? m + s.offset : nullptr);
    map_begins_.push_back(m);
    map_ends_.push_back(m ? m + s.file->size() : nullptr);
    any_mapped |= m != nullptr;
  }
  if (out) out_fd_ = hold(out->holder(), out->path(), fn + ": writing");
  if (any_mapped) ensure_sigbus_handler();
}

void StreamFiles::check_mapped_inputs(uint64_t numel) const {
  for (size_t i = 0; i < in_.size(); ++i) {
    if (!maps_[i]) continue;
    InputFile* f = in_[i].file;
    const uint64_t end = in_[i].offset + numel * dtype_size(dt_[i]);  // checked by check_slice
    const int64_t now = f->current_size();
    if (now >= 0 && static_cast<uint64_t>(now) < end) fail_mapping_fault(f);
  }
}

int StreamFiles::hold(FdHolder& h, const std::string& path, const std::string& what) {
  uses_.push_back(std::make_unique<FdUse>(h, path, what.c_str()));
  return uses_.back()->fd();
}

void StreamFiles::read(size_t i, uint64_t e0, uint64_t m, void* buf) const {
  const uint64_t sz = dtype_size(dt_[i]);
  in_[i].file->pread_exact(fds_[i], in_[i].offset + e0 * sz, buf, m * sz);
}

void StreamFiles::write(uint64_t e0, const void* buf, uint64_t m) const {
  const uint64_t sz = dtype_size(out_dt_);
  out_->pwrite_exact(out_fd_, out_offset_ + e0 * sz, buf, m * sz);
}

// ---- ChunkReader ---------------------------------------------------------------------------------

namespace {

const uintptr_t kPage = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
// Chunks smaller than this (TIES' sample blocks) are read at scattered places: the range after
// one is not the next one read, so it is not worth a system call.
constexpr uint64_t kMinWillNeed = 64 << 10;

// The page cache holds large folios (up to 2 MiB, as readahead of a sequential mapping makes
// them) and a fault maps a whole folio, which may reach past the chunk that faulted: pages are
// dropped from our page tables in blocks this large, or they would stay mapped at every edge of a
// tensor.
constexpr uintptr_t kDropBlock = 2 << 20;

// madvise over [p, p + n) widened to multiples of `align` (a power of two, at least a page) and
// clipped to the mapping [begin, end); advice only, so failures are ignored.
void advise(const unsigned char* p, uint64_t n, const unsigned char* begin, const unsigned char* end,
            uintptr_t align, int advice) {
  if (n == 0 || p >= end) return;
  uintptr_t a = reinterpret_cast<uintptr_t>(p) & ~(align - 1);
  uintptr_t b = reinterpret_cast<uintptr_t>(p) + std::min<uint64_t>(n, static_cast<uint64_t>(end - p));
  b = (b + align - 1) & ~(align - 1);
  a = std::max(a, reinterpret_cast<uintptr_t>(begin));  // begin is page-aligned
  b = std::min(b, (reinterpret_cast<uintptr_t>(end) + kPage - 1) & ~(kPage - 1));
  if (b > a) (void)::madvise(reinterpret_cast<void*>(a), b - a, advice);
}

}  // namespace

ChunkReader::ChunkReader(const StreamFiles& f, uint64_t chunk, bool with_out,
                         const std::vector<char>* use)
    : f_(f), read_(f.size(), 1), bufs_(f.size()), ptrs_(f.size(), nullptr), held_(f.size(), 0) {
  const char* what = f.buffers_name().c_str();
  for (size_t i = 0; i < f.size(); ++i) {
    if (use && !(*use)[i]) read_[i] = 0;
    if (!read_[i] || f.mapped(i)) continue;
    bufs_[i] = alloc_array<unsigned char>(chunk * dtype_size(f.dtype(i)), what);
    ptrs_[i] = bufs_[i].get();
  }
  if (with_out) obuf_ = alloc_array<unsigned char>(chunk * dtype_size(f.out_dtype()), what);
}

ChunkReader::~ChunkReader() {
  for (size_t i = 0; i < held_.size(); ++i) release(i);
}

// Neighbouring chunks may share a drop block with this one; dropping it from our page tables
// under another thread's reads only costs that thread a minor fault.
void ChunkReader::release(size_t i) {
  if (held_[i] == 0) return;
  advise(ptrs_[i], held_[i], f_.map_begin(i), f_.map_end(i), kDropBlock, MADV_DONTNEED);
  held_[i] = 0;
}

void ChunkReader::load(uint64_t e0, uint64_t m) {
  fault_hook_tick();
  for (size_t i = 0; i < bufs_.size(); ++i) {
    if (!read_[i]) continue;
    if (const unsigned char* base = f_.mapped(i)) {
      release(i);
      const uint64_t sz = dtype_size(f_.dtype(i));
      ptrs_[i] = base + e0 * sz;
      held_[i] = m * sz;
      if (held_[i] >= kMinWillNeed)
        advise(ptrs_[i] + held_[i], held_[i], f_.map_begin(i), f_.map_end(i), kPage, MADV_WILLNEED);
    } else {
      f_.read(i, e0, m, bufs_[i].get());
    }
  }
}

}  // namespace lsf
