// Streaming of file kernels (blend, row MAV, TIES, the LoRA blend): the checks of the file slices,
// the descriptors held for a call, and per-thread chunks of the inputs (pointers straight into an
// input's mapping, or buffers read with pread) and of the output (a buffer written with pwrite).
// No Python here; everything throws lsf::CoreErr.
//
// A kernel may read a chunk of a mapped input only inside lsf::recoverable (mapped.hpp).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common.hpp"
#include "io.hpp"
#include "kernel_util.hpp"

namespace lsf {

// The most elements per chunk for a kernel whose inputs and output take elem_bytes per element
// together, so that one thread's chunks stay in its L2 cache: pread copies into cached buffers,
// and the kernel reads them there (a 2 MiB chunk per input measured 1.4-2x the CPU of 128 KiB
// ones for a blend of two BF16 inputs, bench/RESULTS.md session 11). At least 1024.
inline uint64_t cached_chunk_elems(uint64_t elem_bytes) {
  uint64_t cap = 1024;
  while (cap * 2 * elem_bytes <= (uint64_t{1} << 20)) cap *= 2;
  return cap;
}

// The most input bytes of one tensor that passes over it keep mapped for the next pass
// (ChunkReader's keep): about what readers that drop behind them hold mapped over a few inputs
// and threads, so that keeping them adds little to the peak RSS.
inline constexpr uint64_t kKeepMappedBytes = uint64_t{128} << 20;

// CoreErr unless numel elements of dt at s fit inside s's file.
void check_slice(const FileSlice& s, uint64_t numel, DType dt, const std::string& role);

// check_slice for each slice; role "f: inputs" names slice i "f: inputs[i]".
void check_slices(const std::vector<FileSlice>& s, const std::vector<DType>& dt, uint64_t numel,
                  const std::string& role);

// CoreErr unless numel elements of dt at off fit inside out; fn names the calling kernel.
void check_out_slice(const ShardWriter& out, uint64_t off, uint64_t numel, DType dt,
                     const std::string& fn);

// The files one call of a file kernel streams: its inputs (the base first, where there is one),
// each with its dtype, and optionally the output. Their descriptors are held for the whole call:
// close() elsewhere then waits for us, so no fd is closed (and its number reused) under a running
// pread or pwrite. They are taken base, inputs, output, so the first closed file is the one the
// error names.
class StreamFiles {
 public:
  StreamFiles(const std::string& fn, const FileSlice* base, DType base_dt,
              const std::vector<FileSlice>& in, const std::vector<DType>& in_dt,
              ShardWriter* out = nullptr, uint64_t out_offset = 0, DType out_dt = DType::F32);
  StreamFiles(const StreamFiles&) = delete;
  StreamFiles& operator=(const StreamFiles&) = delete;

  size_t size() const { return in_.size(); }
  DType dtype(size_t i) const { return dt_[i]; }
  DType out_dtype() const { return out_dt_; }
  // Names the buffers in an out-of-memory error.
  const std::string& buffers_name() const { return buffers_; }
  // Elements [e0, e0 + m) of input i into buf.
  void read(size_t i, uint64_t e0, uint64_t m, void* buf) const;
  // m elements of the output dtype from buf to the output, starting at element e0.
  void write(uint64_t e0, const void* buf, uint64_t m) const;
  // Input i's first element in its file's mapping, or null when it is read with pread.
  const unsigned char* mapped(size_t i) const { return maps_[i]; }
  // The start and end of the mapping of input i's file (valid when mapped(i)).
  const unsigned char* map_begin(size_t i) const { return map_begins_[i]; }
  const unsigned char* map_end(size_t i) const { return map_ends_[i]; }
  // CoreErr if a mapped input's file now ends before the input's numel elements. A kernel calls
  // it after its last read: a file cut inside the page that held the input's last bytes reads as
  // zeros past the cut instead of faulting.
  void check_mapped_inputs(uint64_t numel) const;

 private:
  int hold(FdHolder& h, const std::string& path, const std::string& what);

  std::string buffers_;
  std::vector<FileSlice> in_;
  std::vector<DType> dt_;
  ShardWriter* out_;
  uint64_t out_offset_;
  DType out_dt_;
  std::vector<int> fds_;  // one per input
  std::vector<const unsigned char*> maps_, map_begins_, map_ends_;
  int out_fd_ = -1;
  std::vector<std::unique_ptr<FdUse>> uses_;
};

// One thread's chunks of at most `chunk` elements of the inputs of a StreamFiles (only those
// flagged in `use`, when given): a buffer per input read with pread, a pointer into the mapping
// of each mapped one; and, with with_out, a buffer for the output.
//
// The pages of mapped chunks are dropped from our page tables (they stay in the page cache, clean
// and unmapped, as after a pread) in 2 MiB blocks behind the reader once they reach 16 MiB, and
// at the end, so that a long run over mapped inputs grows the RSS by at most about that per input
// and thread. A reader made with keep drops nothing: for a pass over a tensor that a later
// reader of the same tensor follows, which then finds the pages mapped and drops them itself.
class ChunkReader {
 public:
  ChunkReader(const StreamFiles& f, uint64_t chunk, bool with_out,
              const std::vector<char>* use = nullptr, bool keep = false);
  ~ChunkReader();
  ChunkReader(const ChunkReader&) = delete;
  ChunkReader& operator=(const ChunkReader&) = delete;

  // Make elements [e0, e0 + m) of every input read available through in(), in input order:
  // pread into its buffer, or a pointer into its mapping. Read them only inside lsf::recoverable.
  void load(uint64_t e0, uint64_t m);
  // Each input's chunk from the last load, null for those not read. The pointers change with
  // every load.
  const unsigned char* const* in() const { return ptrs_.data(); }
  unsigned char* out() { return obuf_.get(); }
  // Write the first m elements of the output buffer to the output at element e0.
  void store(uint64_t e0, uint64_t m) const { f_.write(e0, obuf_.get(), m); }

 private:
  const StreamFiles& f_;
  std::vector<char> read_;  // which inputs are read
  std::vector<Array<unsigned char>> bufs_;
  std::vector<const unsigned char*> ptrs_;
  // Per mapped input: the start of what this reader read and has not dropped (2 MiB-aligned), and
  // the end of what it read.
  std::vector<uintptr_t> lo_, hi_;
  Array<unsigned char> obuf_;
  bool keep_;  // drop nothing
};

}  // namespace lsf
