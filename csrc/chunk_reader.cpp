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
// The page cache holds large folios (up to 2 MiB, as readahead of a sequential mapping makes
// them) and a fault maps a whole folio, which may reach past the chunk that faulted: pages are
// dropped in blocks this large. Nothing is mapped ahead: faults map the folios around them in a
// batch (fault-around), and MADV_POPULATE_READ measured slower than faults on a warm 2.2 GB shard
// (7.9 against 12.1 GB/s touching every page, one thread), MADV_WILLNEED a system call per chunk
// that does nothing once the pages are cached.
constexpr uintptr_t kBlock = 2 << 20;
// A sequential reader drops the blocks behind it once they add up to this much. Dropping is a
// TLB shootdown on every CPU the process runs on (an interprocessor interrupt, a VM exit under a
// hypervisor): per chunk it cost more than the reads (TIES over three 1b experts took 8.6x a copy
// mapped, 5.0x through pread, bench/RESULTS.md), while the bound on what stays mapped is
// this span per input and thread.
constexpr uintptr_t kDropSpan = 16 << 20;

uintptr_t down(uintptr_t a, uintptr_t align) { return a & ~(align - 1); }
uintptr_t up(uintptr_t a, uintptr_t align) { return (a + align - 1) & ~(align - 1); }

// madvise over [a, b) clipped to the mapping [begin, end) (begin is page-aligned, the end is
// rounded up to a page); advice only, so failures are ignored.
void advise(uintptr_t a, uintptr_t b, const unsigned char* begin, const unsigned char* end,
            int advice) {
  a = std::max(a, reinterpret_cast<uintptr_t>(begin));
  b = std::min(b, up(reinterpret_cast<uintptr_t>(end), kPage));
  if (b > a) (void)::madvise(reinterpret_cast<void*>(a), b - a, advice);
}

}  // namespace

ChunkReader::ChunkReader(const StreamFiles& f, uint64_t chunk, bool with_out,
                         const std::vector<char>* use, bool keep)
    : f_(f),
      read_(f.size(), 1),
      bufs_(f.size()),
      ptrs_(f.size(), nullptr),
      lo_(f.size(), 0),
      hi_(f.size(), 0),
      keep_(keep) {
  const char* what = f.buffers_name().c_str();
  for (size_t i = 0; i < f.size(); ++i) {
    if (use && !(*use)[i]) read_[i] = 0;
    if (!read_[i] || f.mapped(i)) continue;
    bufs_[i] = alloc_array<unsigned char>(chunk * dtype_size(f.dtype(i)), what);
    ptrs_[i] = bufs_[i].get();
  }
  if (with_out) obuf_ = alloc_array<unsigned char>(chunk * dtype_size(f.out_dtype()), what);
}

// What this reader mapped and has not dropped yet; neighbouring readers (the other thread's
// chunks, the next tensor) may share its edge blocks, and dropping those under them only costs
// them a minor fault.
ChunkReader::~ChunkReader() {
  if (keep_) return;
  for (size_t i = 0; i < lo_.size(); ++i)
    if (hi_[i] > lo_[i])
      advise(lo_[i], up(hi_[i], kBlock), f_.map_begin(i), f_.map_end(i), MADV_DONTNEED);
}

void ChunkReader::load(uint64_t e0, uint64_t m) {
  fault_hook_tick();
  for (size_t i = 0; i < bufs_.size(); ++i) {
    if (!read_[i]) continue;
    if (const unsigned char* base = f_.mapped(i)) {
      const uint64_t sz = dtype_size(f_.dtype(i));
      ptrs_[i] = base + e0 * sz;
      if (keep_) continue;
      const uintptr_t a = reinterpret_cast<uintptr_t>(ptrs_[i]), b = a + m * sz;
      // Drop the blocks behind this chunk once they reach kDropSpan (and everything mapped before
      // when the reader starts over, as a second pass over the tensor does).
      if (hi_[i] == 0 || a < lo_[i]) {
        if (hi_[i] > lo_[i])
          advise(lo_[i], up(hi_[i], kBlock), f_.map_begin(i), f_.map_end(i), MADV_DONTNEED);
        lo_[i] = down(a, kBlock);
        hi_[i] = b;
      } else if (down(a, kBlock) - lo_[i] >= kDropSpan) {
        advise(lo_[i], down(a, kBlock), f_.map_begin(i), f_.map_end(i), MADV_DONTNEED);
        lo_[i] = down(a, kBlock);
      }
      hi_[i] = std::max<uintptr_t>(hi_[i], b);
    } else {
      f_.read(i, e0, m, bufs_[i].get());
    }
  }
}

}  // namespace lsf
