// The TIES entry points: where a pass finds its elements (memory buffers or file chunks) and the
// drivers that run the passes over them.
#include "ties.hpp"

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "chunk_reader.hpp"
#include "mapped.hpp"
#include "ties_internal.hpp"

namespace lsf {

using namespace ties_detail;

namespace {

constexpr uint64_t kTask = 1ULL << 16;   // elements per task of the in-memory drivers
// ties_file reads chunks of at most about this many bytes per thread (base, experts and output
// together; chunk_elems may ask for fewer): they are still in the L2 cache when the kernels read
// them, and pread copies into cached buffers faster. Results do not depend on the chunk size.
constexpr uint64_t kChunkBytes = 1ULL << 20;

class MemChunks : public Chunks {
 public:
  MemChunks(const unsigned char* base0, DType bdt, const std::vector<const unsigned char*>& ex0,
            const std::vector<DType>& edt, unsigned char* out0, DType odt)
      : base0_(base0), bsz_(dtype_size(bdt)), ex0_(ex0), out0_(out0), osz_(dtype_size(odt)) {
    for (DType d : edt) esz_.push_back(dtype_size(d));
    ex.assign(ex0.size(), nullptr);
  }
  void load(uint64_t e0, uint64_t) override {
    base = base0_ + e0 * bsz_;
    for (size_t e = 0; e < ex.size(); ++e) ex[e] = ex0_[e] + e0 * esz_[e];
  }
  unsigned char* out_begin(uint64_t e0) override { return out0_ + e0 * osz_; }
  void out_end(uint64_t, uint64_t) override {}

 private:
  const unsigned char* base0_;
  uint64_t bsz_;
  const std::vector<const unsigned char*>& ex0_;
  std::vector<uint64_t> esz_;
  unsigned char* out0_;
  uint64_t osz_;
};

// Reads only the experts flagged in `use` (the base always).
class FileChunks : public Chunks {
 public:
  FileChunks(const StreamFiles& f, uint64_t chunk, const std::vector<char>& use, bool with_out)
      : r_(f, chunk, with_out, &with_base(use)) {
    ex.assign(f.size() - 1, nullptr);
  }
  void load(uint64_t e0, uint64_t m) override {
    r_.load(e0, m);  // mapped inputs: new pointers every time
    base = r_.in()[0];
    for (size_t e = 0; e < ex.size(); ++e) ex[e] = r_.in()[1 + e];
  }
  unsigned char* out_begin(uint64_t) override { return r_.out(); }
  void out_end(uint64_t e0, uint64_t m) override { r_.store(e0, m); }

 private:
  // use_ is built before r_, which reads it in its constructor only.
  const std::vector<char>& with_base(const std::vector<char>& use) {
    use_.assign(1, 1);
    use_.insert(use_.end(), use.begin(), use.end());
    return use_;
  }
  std::vector<char> use_;
  ChunkReader r_;
};

Job mem_job(const unsigned char* base, DType bdt, const std::vector<const unsigned char*>& ex,
            const std::vector<DType>& edt, unsigned char* out, DType odt, uint64_t numel,
            int64_t threads) {
  if (ex.empty()) fail("ties: at least one expert is required");
  Job job{bdt, edt, numel, kTask, threads, nullptr};
  job.make = [=, &ex, &edt](const std::vector<char>&, bool) -> std::unique_ptr<Chunks> {
    return std::unique_ptr<Chunks>(new MemChunks(base, bdt, ex, edt, out, odt));
  };
  return job;
}

}  // namespace

// ---- drivers -----------------------------------------------------------------------------------

std::vector<float> ties_thresholds_buffers_run(const unsigned char* base, DType base_dt,
                                               const std::vector<const unsigned char*>& ex,
                                               const std::vector<DType>& ex_dt, uint64_t numel,
                                               uint64_t keep, int64_t threads) {
  Job job = mem_job(base, base_dt, ex, ex_dt, nullptr, DType::F32, numel, threads);
  return select_thresholds(job, keep).tau;
}

void ties_buffers_run(const unsigned char* base, DType base_dt,
                      const std::vector<const unsigned char*>& ex,
                      const std::vector<DType>& ex_dt, unsigned char* out, DType out_dt,
                      uint64_t numel, uint64_t keep, float lam, int64_t threads) {
  Job job = mem_job(base, base_dt, ex, ex_dt, out, out_dt, numel, threads);
  if (numel == 0) return;
  Thresholds th = select_thresholds(job, keep);
  merge_pass(job, th, lam, out_dt);
}

void ties_file_run(const FileSlice& base, DType base_dt, const std::vector<FileSlice>& ex,
                   const std::vector<DType>& ex_dt, ShardWriter& out, uint64_t out_offset,
                   DType out_dt, uint64_t numel, uint64_t keep, float lam, uint64_t chunk_elems,
                   int64_t threads, uint64_t record_budget) {
  const size_t n = ex.size();
  if (n == 0) fail("ties_file: at least one expert is required");
  if (ex_dt.size() != n) fail("ties_file: expert_dtypes and experts differ in length");
  if (chunk_elems == 0) fail("ties_file: chunk_elems must be >= 1");
  check_slice(base, numel, base_dt, "ties_file: base");
  check_slices(ex, ex_dt, numel, "ties_file: experts");
  check_out_slice(out, out_offset, numel, out_dt, "ties_file");
  const StreamFiles files("ties_file", &base, base_dt, ex, ex_dt, &out, out_offset, out_dt);
  if (numel == 0) return;
  uint64_t elem_bytes = dtype_size(base_dt) + dtype_size(out_dt);
  for (DType d : ex_dt) elem_bytes += dtype_size(d);
  uint64_t cap = kBlk;
  while (cap * 2 * elem_bytes <= kChunkBytes) cap *= 2;
  const uint64_t chunk = std::min({chunk_elems, numel, cap});

  Job job{base_dt, ex_dt, numel, chunk, threads, nullptr};
  job.make = [&files, chunk](const std::vector<char>& use,
                             bool with_out) -> std::unique_ptr<Chunks> {
    return std::unique_ptr<Chunks>(new FileChunks(files, chunk, use, with_out));
  };
  if (!ties_one_pass(job, files, keep, lam, record_budget)) {
    Thresholds th = select_thresholds(job, keep);
    merge_pass(job, th, lam, out_dt);
  }
  files.check_mapped_inputs(numel);
}

}  // namespace lsf
