// Blend and row-MAV kernels over memory buffers and streamed from files. No Python here; all
// functions run without the GIL and throw lsf::CoreErr.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "common.hpp"
#include "io.hpp"

namespace lsf {

// ---- single-threaded building blocks -----------------------------------------------------------

// out[j] = round_out(sum_i float32(w[i]) * float32(in[i][j])) for j < n; products rounded to
// float32, summed in input order starting with the first product.
void blend_range(size_t n_inputs, const unsigned char* const* in, const DType* in_dt,
                 const float* w, unsigned char* out, DType out_dt, size_t n);

// For n consecutive elements of one row, starting at a multiple of 64 from the row start and
// either a multiple of 64 long or ending at the row end: acc[e] += sum over 64-element blocks of
// (double) float32-sum |float32(ex[e][j]) - float32(base[j])|, blocks in order.
void mav_segment(const unsigned char* base, DType base_dt, size_t n_experts,
                 const unsigned char* const* ex, const DType* ex_dt, size_t n, double* acc);

// ---- drivers (validated inputs, multi-threaded) ------------------------------------------------

void blend_buffers_run(const std::vector<const unsigned char*>& in,
                       const std::vector<DType>& in_dt, const std::vector<float>& w,
                       unsigned char* out, DType out_dt, uint64_t numel, int64_t threads);

void blend_file_run(const std::vector<FileSlice>& in, const std::vector<DType>& in_dt,
                    const std::vector<float>& w, ShardWriter& out, uint64_t out_offset,
                    DType out_dt, uint64_t numel, uint64_t chunk_elems, int64_t threads);

// A LoRA product term: weight * (B . A), B rows x rank and A rank x cols, float32, row-major.
struct LowRankFactor {
  const float* b;
  const float* a;
  uint64_t rank;
  float weight;
};

// out = round_out(sum_t w[t] * float32(x_t) + sum_f weight_f * P_f) for a rows x cols matrix, the
// x_t streamed from files like blend_file_run. P_f[i][j] = fma chain over k ascending from +0 of
// B_f[i][k] * A_f[k][j]; every other product rounded to float32 and added in order (terms, then
// factors). Tasks of max(1, chunk_elems / cols) rows rounded up to a multiple of 4. The factors' sizes must have been checked
// by the caller.
void blend_lowrank_file_run(const std::vector<FileSlice>& in, const std::vector<DType>& in_dt,
                            const std::vector<float>& w, const std::vector<LowRankFactor>& factors,
                            ShardWriter& out, uint64_t out_offset, DType out_dt, uint64_t rows,
                            uint64_t cols, uint64_t chunk_elems, int64_t threads);

// Testing hook: false makes the low-rank products take their portable form, not AVX2.
void set_lowrank_simd_enabled(bool enabled);

// out: n_experts x rows doubles, row-major.
void row_mav_buffers_run(const std::vector<const unsigned char*>& ex,
                         const std::vector<DType>& ex_dt, const unsigned char* base,
                         DType base_dt, uint64_t rows, uint64_t cols, double* out,
                         int64_t threads);

void row_mav_file_run(const std::vector<FileSlice>& ex, const std::vector<DType>& ex_dt,
                      const FileSlice& base, DType base_dt, uint64_t rows, uint64_t cols,
                      double* out, uint64_t chunk_elems, int64_t threads);

}  // namespace lsf
