// TIES-merging (Yadav et al., 2023) of N experts against a base, per tensor, over memory buffers
// and streamed from files. No Python here; all functions run without the GIL and throw
// lsf::CoreErr. Specification: ties_* in layerswap_fast/_core.pyi.
//
// The trim threshold tau_i (the k-th largest |d_i|) is found exactly by a two-level radix select
// over the bit patterns of |d_i| (for non-negative float32 the uint32 pattern orders like the
// value; NaN patterns order above +inf):
//   pass 1  histogram of the top 16 bits of every |d_i| (plus, per bin, the count of values whose
//           low 16 bits are 0: when the wanted rank falls among those, no pass 2 is needed);
//   pass 2  histogram of the low 16 bits of the elements in the selected bin (skipped when every
//           expert's threshold is already known);
//   pass 3  trim, elect, disjoint mean, write.
// Histograms are integer counts, so results do not depend on threads or chunking.
//
// ties_file_run first tries one pass over a sampled bracket (large tensors, record_budget > 0):
// it writes under thresholds guessed from a sample, counts and records the elements near each
// guess (at most record_budget bytes of records), then fixes tau_i exactly from those and rewrites
// only what differs; a guess outside its bracket or a full budget falls back to the passes above.
// Every route writes the same bytes.
#pragma once

#include <cstdint>
#include <vector>

#include "common.hpp"
#include "io.hpp"
#include "kernels.hpp"  // FileSlice

namespace lsf {

// tau_i for every expert: the keep-th largest |float32(e_i) - float32(base)| (a NaN pattern
// when NaNs reach the keep-th place); +inf when keep == 0, 0 when keep >= numel.
std::vector<float> ties_thresholds_buffers_run(const unsigned char* base, DType base_dt,
                                               const std::vector<const unsigned char*>& ex,
                                               const std::vector<DType>& ex_dt, uint64_t numel,
                                               uint64_t keep, int64_t threads);

void ties_buffers_run(const unsigned char* base, DType base_dt,
                      const std::vector<const unsigned char*>& ex,
                      const std::vector<DType>& ex_dt, unsigned char* out, DType out_dt,
                      uint64_t numel, uint64_t keep, float lam, int64_t threads);

void ties_file_run(const FileSlice& base, DType base_dt, const std::vector<FileSlice>& ex,
                   const std::vector<DType>& ex_dt, ShardWriter& out, uint64_t out_offset,
                   DType out_dt, uint64_t numel, uint64_t keep, float lam, uint64_t chunk_elems,
                   int64_t threads, uint64_t record_budget);

// Which way the ties_file calls of this process went (see ties_file in _core.pyi).
struct TiesFileStats {
  uint64_t one_pass, rewritten, fallback_budget, fallback_miss, records, patched;
};
TiesFileStats ties_file_stats();

// Testing hook: false makes the BF16 merge loop take its portable form instead of AVX-512.
void set_ties_simd_enabled(bool enabled);

}  // namespace lsf
