// Streaming of file kernels (blend, row MAV, TIES): the checks of the file slices, the descriptors
// held for a call, and per-thread buffers that read chunks of the inputs and write chunks of the
// output through the I/O layer. No Python here; everything throws lsf::CoreErr.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common.hpp"
#include "io.hpp"
#include "kernel_util.hpp"

namespace lsf {

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

 private:
  int hold(FdHolder& h, const std::string& path, const std::string& what);

  std::string buffers_;
  std::vector<FileSlice> in_;
  std::vector<DType> dt_;
  ShardWriter* out_;
  uint64_t out_offset_;
  DType out_dt_;
  std::vector<int> fds_;  // one per input
  int out_fd_ = -1;
  std::vector<std::unique_ptr<FdUse>> uses_;
};

// One thread's buffers for chunks of at most `chunk` elements: one per input of a StreamFiles
// (only for the inputs flagged in `use`, when given) and, with with_out, one for the output.
class ChunkReader {
 public:
  ChunkReader(const StreamFiles& f, uint64_t chunk, bool with_out,
              const std::vector<char>* use = nullptr);

  // Read elements [e0, e0 + m) of every input read into its buffer, in input order.
  void load(uint64_t e0, uint64_t m);
  // The buffer of each input, null for those not read.
  const unsigned char* const* in() const { return ptrs_.data(); }
  unsigned char* out() { return obuf_.get(); }
  // Write the first m elements of the output buffer to the output at element e0.
  void store(uint64_t e0, uint64_t m) const { f_.write(e0, obuf_.get(), m); }

 private:
  const StreamFiles& f_;
  std::vector<Array<unsigned char>> bufs_;
  std::vector<const unsigned char*> ptrs_;
  Array<unsigned char> obuf_;
};

}  // namespace lsf
