#include "kernels.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>

#include <immintrin.h>

#include "chunk_reader.hpp"
#include "kernel_util.hpp"
#include "mapped.hpp"
#include "numerics.hpp"

namespace lsf {

namespace {

constexpr size_t kBlk = 2048;            // elements per blend block (float32 scratch on the stack)
constexpr size_t kSeg = 2048;            // elements per row-MAV segment (multiple of 64)
constexpr size_t kMavBlock = 64;         // row-MAV float32 partial-sum block
constexpr uint64_t kTask = 1ULL << 16;   // elements per task of the in-memory drivers
static_assert(kSeg % kMavBlock == 0, "segments must hold whole blocks");

template <DType D>
LSF_INLINE void pass_first(float* __restrict acc, const unsigned char* __restrict p, float w,
                           size_t m) {
  for (size_t j = 0; j < m; ++j) acc[j] = w * Elem<D>::load(p, j);
}

template <DType D>
LSF_INLINE void pass_add(float* __restrict acc, const unsigned char* __restrict p, float w,
                         size_t m) {
  for (size_t j = 0; j < m; ++j) {
    const float prod = w * Elem<D>::load(p, j);
    acc[j] = acc[j] + prod;
  }
}

// Last input fused with the output conversion (saves a pass over acc).
template <DType DI, DType DO>
LSF_INLINE void pass_add_store(unsigned char* __restrict out, const float* __restrict acc,
                               const unsigned char* __restrict p, float w, size_t m) {
  for (size_t j = 0; j < m; ++j) {
    const float prod = w * Elem<DI>::load(p, j);
    Elem<DO>::store(out, j, acc[j] + prod);
  }
}

template <DType DI, DType DO>
LSF_INLINE void pass_first_store(unsigned char* __restrict out, const unsigned char* __restrict p,
                                 float w, size_t m) {
  for (size_t j = 0; j < m; ++j) Elem<DO>::store(out, j, w * Elem<DI>::load(p, j));
}

// ---- row-MAV passes ----------------------------------------------------------------------------

template <DType D>
LSF_INLINE void pass_absdiff(float* __restrict d, const unsigned char* __restrict p,
                             const float* __restrict b, size_t m) {
  constexpr size_t esz = kElemBytes<D>;
  constexpr size_t per_line = 64 / esz;
  size_t j = 0;
  for (; j + per_line <= m; j += per_line) {
    __builtin_prefetch(p + j * esz + kAhead);
    for (size_t i = 0; i < per_line; ++i) d[j + i] = std::fabs(Elem<D>::load(p, j + i) - b[j + i]);
  }
  for (; j < m; ++j) d[j] = std::fabs(Elem<D>::load(p, j) - b[j]);
}

#if defined(__x86_64__) || defined(__i386__)
// s + the columns of eight 64-element blocks (b, b + 64, ..., b + 7 * 64) at elements j..j+7, in
// column order: lane k adds block k's elements j, j+1, ..., j+7 one at a time, as the portable
// loop does (the same additions, the same bits), after an 8x8 transpose of the loads.
__attribute__((target("avx2"), always_inline)) inline __m256 add_columns(__m256 s, const float* b) {
  __m256 r[8], t[8], u[8];
  for (size_t i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(b + i * kMavBlock);
  for (size_t i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (size_t i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (size_t c = 0; c < 4; ++c) s = _mm256_add_ps(s, _mm256_permute2f128_ps(u[c], u[c + 4], 0x20));
  for (size_t c = 0; c < 4; ++c) s = _mm256_add_ps(s, _mm256_permute2f128_ps(u[c], u[c + 4], 0x31));
  return s;
}

// The float32 sums of the first (full / 8) * 8 64-element blocks of d into bs; returns how many.
// Each register's additions form one dependency chain, so four groups of eight blocks run side by
// side while there are that many.
__attribute__((target("avx2"))) size_t block_sums_avx2(const float* __restrict d, size_t full,
                                                       float* __restrict bs) {
  constexpr size_t G = 8 * kMavBlock;  // elements of a group of eight blocks
  size_t k = 0;
  for (; k + 32 <= full; k += 32) {
    const float* b = d + k * kMavBlock;
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (size_t j = 0; j < kMavBlock; j += 8) {
      s0 = add_columns(s0, b + j);
      s1 = add_columns(s1, b + G + j);
      s2 = add_columns(s2, b + 2 * G + j);
      s3 = add_columns(s3, b + 3 * G + j);
    }
    _mm256_storeu_ps(bs + k, s0);
    _mm256_storeu_ps(bs + k + 8, s1);
    _mm256_storeu_ps(bs + k + 16, s2);
    _mm256_storeu_ps(bs + k + 24, s3);
  }
  for (; k + 8 <= full; k += 8) {
    __m256 s = _mm256_setzero_ps();
    for (size_t j = 0; j < kMavBlock; j += 8) s = add_columns(s, d + k * kMavBlock + j);
    _mm256_storeu_ps(bs + k, s);
  }
  return k;
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
#endif

// acc + the float32 sums of the 64-element blocks of d[0, m), blocks added in order (in double).
// Each block is summed sequentially from its first element; eight blocks run side by side only
// to give the CPU independent dependency chains, which does not change any result.
LSF_INLINE double add_block_sums(const float* __restrict d, size_t m, double acc) {
  float bs[kSeg / kMavBlock + 1];
  const size_t full = m / kMavBlock;
  size_t k = 0;
#if defined(__x86_64__) || defined(__i386__)
  if (cpu_has_avx2()) k = block_sums_avx2(d, full, bs);
#endif
  for (; k + 8 <= full; k += 8) {
    const float* b = d + k * kMavBlock;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f, s4 = 0.f, s5 = 0.f, s6 = 0.f, s7 = 0.f;
    for (size_t j = 0; j < kMavBlock; ++j) {
      s0 = s0 + b[0 * kMavBlock + j];
      s1 = s1 + b[1 * kMavBlock + j];
      s2 = s2 + b[2 * kMavBlock + j];
      s3 = s3 + b[3 * kMavBlock + j];
      s4 = s4 + b[4 * kMavBlock + j];
      s5 = s5 + b[5 * kMavBlock + j];
      s6 = s6 + b[6 * kMavBlock + j];
      s7 = s7 + b[7 * kMavBlock + j];
    }
    bs[k + 0] = s0; bs[k + 1] = s1; bs[k + 2] = s2; bs[k + 3] = s3;
    bs[k + 4] = s4; bs[k + 5] = s5; bs[k + 6] = s6; bs[k + 7] = s7;
  }
  for (; k < full; ++k) {
    float s = 0.f;
    for (size_t j = 0; j < kMavBlock; ++j) s = s + d[k * kMavBlock + j];
    bs[k] = s;
  }
  size_t nb = full;
  if (m % kMavBlock) {
    float s = 0.f;
    for (size_t j = full * kMavBlock; j < m; ++j) s = s + d[j];
    bs[nb++] = s;
  }
  for (size_t i = 0; i < nb; ++i) acc = acc + static_cast<double>(bs[i]);
  return acc;
}

template <DType D>
LSF_INLINE void pass_store(unsigned char* __restrict out, const float* __restrict acc, size_t m) {
  for (size_t j = 0; j < m; ++j) Elem<D>::store(out, j, acc[j]);
}

// ---- low-rank products -------------------------------------------------------------------------
//
// P[i][j] = sum_k B[i][k] * A[k][j] for R rows and w columns: each element a chain of fused
// multiply-adds over k = 0, 1, ..., r - 1 starting from +0 (acc = fma(B[i][k], A[k][j], acc)).
// fma rounds once, so the AVX2 and the portable form give the same bits on every CPU.

constexpr size_t kLrRows = 4;    // rows of the AVX2 form's register block
constexpr size_t kLrBlockRows = 32;  // rows of a product tile
constexpr size_t kLrCols = 128;  // columns of a product tile: r x 128 floats of A (8 KiB at
                                 // rank 16) stay in L1 while every row of the tile uses them

std::atomic<bool> g_lowrank_simd{true};

void lowrank_tile_portable(const float* B, size_t r, const float* A, size_t lda, size_t R,
                           size_t w, float* P, size_t ldp) {
  for (size_t i = 0; i < R; ++i)
    for (size_t j = 0; j < w; ++j) {
      float acc = 0.f;
      for (size_t k = 0; k < r; ++k) acc = std::fma(B[i * r + k], A[k * lda + j], acc);
      P[i * ldp + j] = acc;
    }
}

#if defined(__x86_64__) || defined(__i386__)
#define LSF_HAVE_AVX2_TILE 1
// R rows x 16 columns per step, 2R accumulators in registers.
template <size_t R>
__attribute__((target("avx2,fma"), always_inline)) inline size_t lowrank_rows_avx2(
    const float* B, size_t r, const float* A, size_t lda, size_t w, float* P, size_t ldp) {
  size_t j = 0;
  for (; j + 16 <= w; j += 16) {
    __m256 c0[R], c1[R];
    for (size_t i = 0; i < R; ++i) c0[i] = c1[i] = _mm256_setzero_ps();
    for (size_t k = 0; k < r; ++k) {
      const __m256 a0 = _mm256_loadu_ps(A + k * lda + j);
      const __m256 a1 = _mm256_loadu_ps(A + k * lda + j + 8);
      for (size_t i = 0; i < R; ++i) {
        const __m256 b = _mm256_broadcast_ss(B + i * r + k);
        c0[i] = _mm256_fmadd_ps(b, a0, c0[i]);
        c1[i] = _mm256_fmadd_ps(b, a1, c1[i]);
      }
    }
    for (size_t i = 0; i < R; ++i) {
      _mm256_storeu_ps(P + i * ldp + j, c0[i]);
      _mm256_storeu_ps(P + i * ldp + j + 8, c1[i]);
    }
  }
  return j;
}

__attribute__((target("avx2,fma"))) void lowrank_tile_avx2(const float* B, size_t r,
                                                            const float* A, size_t lda, size_t R,
                                                            size_t w, float* P, size_t ldp) {
  size_t j;
  switch (R) {
    case 4: j = lowrank_rows_avx2<4>(B, r, A, lda, w, P, ldp); break;
    case 3: j = lowrank_rows_avx2<3>(B, r, A, lda, w, P, ldp); break;
    case 2: j = lowrank_rows_avx2<2>(B, r, A, lda, w, P, ldp); break;
    default: j = lowrank_rows_avx2<1>(B, r, A, lda, w, P, ldp); break;
  }
  for (; j < w; ++j)
    for (size_t i = 0; i < R; ++i) {
      float acc = 0.f;
      for (size_t k = 0; k < r; ++k) acc = std::fma(B[i * r + k], A[k * lda + j], acc);
      P[i * ldp + j] = acc;
    }
}

bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

void lowrank_tile(const float* B, size_t r, const float* A, size_t lda, size_t R, size_t w,
                  float* P, size_t ldp) {
#ifdef LSF_HAVE_AVX2_TILE
  if (g_lowrank_simd.load(std::memory_order_relaxed) && cpu_has_avx2_fma()) {
    lowrank_tile_avx2(B, r, A, lda, R, w, P, ldp);
    return;
  }
#endif
  lowrank_tile_portable(B, r, A, lda, R, w, P, ldp);
}

}  // namespace

void set_lowrank_simd_enabled(bool enabled) { g_lowrank_simd.store(enabled); }

// For each of rows [0, R) of a row group: out = round(sum_t w_t x_t + sum_f c_f P_f), w columns.
// in[t] / out point at the group's first element of this tile, rows `stride` elements apart;
// P holds n_f tiles of kLrBlockRows x kLrCols floats.
LSF_CLONES
void lowrank_blend_tile(size_t n_inputs, const unsigned char* const* in, const DType* in_dt,
                        const float* w, size_t n_f, const float* P, const float* c,
                        unsigned char* out, DType out_dt, size_t R, size_t width, size_t stride) {
  alignas(64) float acc[kLrCols];
  const size_t osz = dtype_size(out_dt);
  for (size_t i = 0; i < R; ++i) {
    for (size_t t = 0; t < n_inputs; ++t) {
      const unsigned char* p = in[t] + i * stride * dtype_size(in_dt[t]);
      const float wt = w[t];
      if (t == 0) {
        LSF_DTYPE_DISPATCH(in_dt[t], DI, pass_first<DI>(acc, p, wt, width));
      } else {
        LSF_DTYPE_DISPATCH(in_dt[t], DI, pass_add<DI>(acc, p, wt, width));
      }
    }
    for (size_t f = 0; f < n_f; ++f)
      pass_add<DType::F32>(acc, reinterpret_cast<const unsigned char*>(P + (f * kLrBlockRows + i) * kLrCols),
                           c[f], width);
    unsigned char* o = out + i * stride * osz;
    LSF_DTYPE_DISPATCH(out_dt, DO, pass_store<DO>(o, acc, width));
  }
}


// ---- building blocks ---------------------------------------------------------------------------

LSF_CLONES
void blend_range(size_t n_inputs, const unsigned char* const* in, const DType* in_dt,
                 const float* w, unsigned char* out, DType out_dt, size_t n) {
  alignas(64) float acc[kBlk];
  const size_t osz = dtype_size(out_dt);
  for (size_t s = 0; s < n; s += kBlk) {
    const size_t m = std::min(kBlk, n - s);
    unsigned char* o = out + s * osz;
    if (n_inputs == 1) {
      const unsigned char* p = in[0] + s * dtype_size(in_dt[0]);
      const float w0 = w[0];
      LSF_DTYPE_DISPATCH(in_dt[0], DI,
                         LSF_DTYPE_DISPATCH(out_dt, DO, pass_first_store<DI, DO>(o, p, w0, m)));
      continue;
    }
    for (size_t i = 0; i + 1 < n_inputs; ++i) {
      const unsigned char* p = in[i] + s * dtype_size(in_dt[i]);
      const float wi = w[i];
      if (i == 0) {
        LSF_DTYPE_DISPATCH(in_dt[i], DI, pass_first<DI>(acc, p, wi, m));
      } else {
        LSF_DTYPE_DISPATCH(in_dt[i], DI, pass_add<DI>(acc, p, wi, m));
      }
    }
    const size_t last = n_inputs - 1;
    const unsigned char* p = in[last] + s * dtype_size(in_dt[last]);
    const float wl = w[last];
    LSF_DTYPE_DISPATCH(in_dt[last], DI,
                       LSF_DTYPE_DISPATCH(out_dt, DO, pass_add_store<DI, DO>(o, acc, p, wl, m)));
  }
}

LSF_CLONES
void mav_segment(const unsigned char* base, DType base_dt, size_t n_experts,
                 const unsigned char* const* ex, const DType* ex_dt, size_t n, double* acc) {
  alignas(64) float bf[kSeg];
  alignas(64) float d[kSeg];
  const size_t bsz = dtype_size(base_dt);
  for (size_t s = 0; s < n; s += kSeg) {
    const size_t m = std::min(kSeg, n - s);
    const unsigned char* bp = base + s * bsz;
    LSF_DTYPE_DISPATCH(base_dt, DI, pass_to_f32_ahead<DI>(bf, bp, m));
    for (size_t e = 0; e < n_experts; ++e) {
      const unsigned char* p = ex[e] + s * dtype_size(ex_dt[e]);
      LSF_DTYPE_DISPATCH(ex_dt[e], DI, pass_absdiff<DI>(d, p, bf, m));
      acc[e] = add_block_sums(d, m, acc[e]);
    }
  }
}

// ---- drivers -----------------------------------------------------------------------------------

void blend_buffers_run(const std::vector<const unsigned char*>& in,
                       const std::vector<DType>& in_dt, const std::vector<float>& w,
                       unsigned char* out, DType out_dt, uint64_t numel, int64_t threads) {
  if (numel == 0) return;
  const size_t n = in.size();
  const uint64_t ntasks = (numel + kTask - 1) / kTask;
  const size_t nthreads = resolve_threads(threads, ntasks);
  const size_t osz = dtype_size(out_dt);
  run_pool(nthreads, ntasks, [&](TaskQueue& q) {
    std::vector<const unsigned char*> ptrs(n);
    uint64_t t;
    while (q.pop(&t)) {
      const uint64_t e0 = t * kTask;
      const uint64_t m = std::min(kTask, numel - e0);
      for (size_t i = 0; i < n; ++i) ptrs[i] = in[i] + e0 * dtype_size(in_dt[i]);
      blend_range(n, ptrs.data(), in_dt.data(), w.data(), out + e0 * osz, out_dt,
                  static_cast<size_t>(m));
    }
  });
}

void blend_file_run(const std::vector<FileSlice>& in, const std::vector<DType>& in_dt,
                    const std::vector<float>& w, ShardWriter& out, uint64_t out_offset,
                    DType out_dt, uint64_t numel, uint64_t chunk_elems, int64_t threads) {
  const size_t n = in.size();
  if (n == 0) fail("blend_file: at least one input is required");
  if (chunk_elems == 0) fail("blend_file: chunk_elems must be >= 1");
  check_slices(in, in_dt, numel, "blend_file: inputs");
  check_out_slice(out, out_offset, numel, out_dt, "blend_file");
  const StreamFiles files("blend_file", nullptr, DType::F32, in, in_dt, &out, out_offset, out_dt);
  if (numel == 0) return;

  uint64_t elem_bytes = dtype_size(out_dt);
  for (DType d : in_dt) elem_bytes += dtype_size(d);
  const uint64_t chunk = std::min({chunk_elems, numel, cached_chunk_elems(elem_bytes)});
  const uint64_t ntasks = (numel + chunk - 1) / chunk;
  const size_t nthreads = resolve_threads(threads, ntasks);

  run_pool(nthreads, ntasks, [&](TaskQueue& q) {
    ChunkReader r(files, chunk, true);
    uint64_t t;
    while (q.pop(&t)) {
      const uint64_t e0 = t * chunk;
      const uint64_t m = std::min(chunk, numel - e0);
      r.load(e0, m);
      const unsigned char* const* in = r.in();
      unsigned char* o = r.out();
      recoverable([&] { blend_range(n, in, in_dt.data(), w.data(), o, out_dt, static_cast<size_t>(m)); });
      r.store(e0, m);
    }
  });
  files.check_mapped_inputs(numel);
}

namespace {

// One worker's row MAVs, written to out (n_experts x rows, row-major). Every row, whole or
// streamed in pieces, goes through the same start_row / add / end_row steps, so its sum is the
// same whichever driver and chunking computed it.
class RowMav {
 public:
  RowMav(DType base_dt, const std::vector<DType>& ex_dt, uint64_t rows, uint64_t cols,
         double* out)
      : base_dt_(base_dt), bsz_(dtype_size(base_dt)), ex_dt_(ex_dt), rows_(rows), cols_(cols),
        out_(out), ptrs_(ex_dt.size()), acc_(ex_dt.size()) {}

  // Rows [r0, r1), whose elements base and ex[e] hold back to back from row `first` on.
  void whole_rows(const unsigned char* base, const unsigned char* const* ex, uint64_t first,
                  uint64_t r0, uint64_t r1) {
    for (uint64_t r = r0; r < r1; ++r) {
      const uint64_t e0 = (r - first) * cols_;
      for (size_t e = 0; e < ptrs_.size(); ++e) ptrs_[e] = ex[e] + e0 * dtype_size(ex_dt_[e]);
      start_row();
      add(base + e0 * bsz_, ptrs_.data(), cols_);
      end_row(r);
    }
  }

  void start_row() { std::fill(acc_.begin(), acc_.end(), 0.0); }
  // The next m elements of the row (see mav_segment for where a piece may start and end).
  void add(const unsigned char* base, const unsigned char* const* ex, uint64_t m) {
    mav_segment(base, base_dt_, acc_.size(), ex, ex_dt_.data(), static_cast<size_t>(m),
                acc_.data());
  }
  void end_row(uint64_t r) {
    for (size_t e = 0; e < acc_.size(); ++e)
      out_[e * rows_ + r] = acc_[e] / static_cast<double>(cols_);
  }

 private:
  DType base_dt_;
  uint64_t bsz_;
  const std::vector<DType>& ex_dt_;
  uint64_t rows_;
  uint64_t cols_;
  double* out_;
  std::vector<const unsigned char*> ptrs_;
  std::vector<double> acc_;
};

}  // namespace

void row_mav_buffers_run(const std::vector<const unsigned char*>& ex,
                         const std::vector<DType>& ex_dt, const unsigned char* base,
                         DType base_dt, uint64_t rows, uint64_t cols, double* out,
                         int64_t threads) {
  if (ex.empty() || rows == 0 || cols == 0) return;
  const uint64_t rows_per_task = std::max<uint64_t>(1, kTask / cols);
  const uint64_t ntasks = (rows + rows_per_task - 1) / rows_per_task;
  const size_t nthreads = resolve_threads(threads, ntasks);
  run_pool(nthreads, ntasks, [&](TaskQueue& q) {
    RowMav mav(base_dt, ex_dt, rows, cols, out);
    uint64_t t;
    while (q.pop(&t)) {
      const uint64_t r0 = t * rows_per_task;
      mav.whole_rows(base, ex.data(), 0, r0, std::min(rows, r0 + rows_per_task));
    }
  });
}

void row_mav_file_run(const std::vector<FileSlice>& ex, const std::vector<DType>& ex_dt,
                      const FileSlice& base, DType base_dt, uint64_t rows, uint64_t cols,
                      double* out, uint64_t chunk_elems, int64_t threads) {
  const size_t n = ex.size();
  if (rows == 0 || cols == 0) fail("row_mav_file: rows and cols must be >= 1");
  if (chunk_elems == 0) fail("row_mav_file: chunk_elems must be >= 1");
  uint64_t numel;
  if (!mul_ok(rows, cols, &numel))
    fail("row_mav_file: rows x cols (" + std::to_string(rows) + " x " + std::to_string(cols) +
         ") overflows a 64-bit size");
  check_slice(base, numel, base_dt, "row_mav_file: base");
  check_slices(ex, ex_dt, numel, "row_mav_file: experts");
  const StreamFiles files("row_mav_file", &base, base_dt, ex, ex_dt);
  if (n == 0) return;
  uint64_t elem_bytes = dtype_size(base_dt);
  for (DType d : ex_dt) elem_bytes += dtype_size(d);
  chunk_elems = std::min(chunk_elems, cached_chunk_elems(elem_bytes));

  // Whole rows per task when a row fits in a chunk; otherwise one row per task, streamed in
  // pieces that are whole 64-element blocks, so that every row is summed in the same order
  // whatever chunk_elems and threads are.
  const bool whole_rows = cols <= chunk_elems;
  const uint64_t rows_per_task = whole_rows ? chunk_elems / cols : 1;
  const uint64_t piece =
      whole_rows ? rows_per_task * cols
                 : std::max<uint64_t>(kMavBlock, chunk_elems / kMavBlock * kMavBlock);
  const uint64_t ntasks = (rows + rows_per_task - 1) / rows_per_task;
  const size_t nthreads = resolve_threads(threads, ntasks);

  run_pool(nthreads, ntasks, [&](TaskQueue& q) {
    ChunkReader r(files, std::min(piece, numel), false);
    const unsigned char* const* in = r.in();  // the base, then the experts
    RowMav mav(base_dt, ex_dt, rows, cols, out);

    uint64_t t;
    while (q.pop(&t)) {
      if (whole_rows) {
        const uint64_t r0 = t * rows_per_task;
        const uint64_t r1 = std::min(rows, r0 + rows_per_task);
        r.load(r0 * cols, (r1 - r0) * cols);
        recoverable([&] { mav.whole_rows(in[0], in + 1, r0, r0, r1); });
      } else {
        const uint64_t row = t;
        mav.start_row();
        for (uint64_t c0 = 0; c0 < cols; c0 += piece) {
          const uint64_t m = std::min(piece, cols - c0);
          r.load(row * cols + c0, m);
          recoverable([&] { mav.add(in[0], in + 1, m); });
        }
        mav.end_row(row);
      }
    }
  });
  files.check_mapped_inputs(numel);
}

}  // namespace lsf

namespace lsf {

void blend_lowrank_file_run(const std::vector<FileSlice>& in, const std::vector<DType>& in_dt,
                            const std::vector<float>& w, const std::vector<LowRankFactor>& factors,
                            ShardWriter& out, uint64_t out_offset, DType out_dt, uint64_t rows,
                            uint64_t cols, uint64_t chunk_elems, int64_t threads) {
  const size_t n = in.size();
  if (n == 0) fail("blend_lowrank_file: at least one input is required");
  if (chunk_elems == 0) fail("blend_lowrank_file: chunk_elems must be >= 1");
  if (rows == 0 || cols == 0) fail("blend_lowrank_file: rows and cols must be >= 1");
  uint64_t numel;
  if (!mul_ok(rows, cols, &numel))
    fail("blend_lowrank_file: rows x cols overflows a 64-bit size");
  check_slices(in, in_dt, numel, "blend_lowrank_file: inputs");
  check_out_slice(out, out_offset, numel, out_dt, "blend_lowrank_file");
  for (size_t f = 0; f < factors.size(); ++f)
    if (factors[f].rank == 0 || !factors[f].b || !factors[f].a)
      fail("blend_lowrank_file: factors[" + std::to_string(f) + "] has rank 0");
  const StreamFiles files("blend_lowrank_file", nullptr, DType::F32, in, in_dt, &out, out_offset,
                          out_dt);

  // Tasks of whole rows, about chunk_elems elements, in whole register blocks of rows where
  // possible; an element's bytes never depend on the task.
  uint64_t rows_per_task = std::max<uint64_t>(1, chunk_elems / cols);
  rows_per_task = std::min(rows, (rows_per_task + kLrRows - 1) / kLrRows * kLrRows);
  const uint64_t ntasks = (rows + rows_per_task - 1) / rows_per_task;
  const size_t nthreads = resolve_threads(threads, ntasks);
  const size_t n_f = factors.size();
  std::vector<float> c(n_f);
  for (size_t f = 0; f < n_f; ++f) c[f] = factors[f].weight;

  // Each factor's A, packed tile by tile (r x kLrCols floats per tile, rows kLrCols apart): the
  // rows of A itself lie cols floats apart, which for cols a multiple of 1024 puts all of a
  // tile's rows in one L1 set.
  const uint64_t ntiles = (cols + kLrCols - 1) / kLrCols;
  std::vector<Array<float>> packed;
  for (size_t f = 0; f < n_f; ++f) {
    const LowRankFactor& fa = factors[f];
    uint64_t count;
    if (!mul_ok(fa.rank, ntiles * kLrCols, &count))
      fail("blend_lowrank_file: factors[" + std::to_string(f) + "] rank x cols overflows");
    packed.push_back(alloc_array<float>(count, "blend_lowrank_file packed factors"));
    float* dst = packed.back().get();
    for (uint64_t tl = 0; tl < ntiles; ++tl) {
      const uint64_t j0 = tl * kLrCols;
      const uint64_t width = std::min<uint64_t>(kLrCols, cols - j0);
      for (uint64_t k = 0; k < fa.rank; ++k) {
        float* d = dst + (tl * fa.rank + k) * kLrCols;
        std::memcpy(d, fa.a + k * cols + j0, width * sizeof(float));
        std::fill(d + width, d + kLrCols, 0.f);
      }
    }
  }

  run_pool(nthreads, ntasks, [&](TaskQueue& q) {
    ChunkReader r(files, rows_per_task * cols, true);
    Array<float> P = alloc_array<float>(std::max<size_t>(1, n_f) * kLrBlockRows * kLrCols,
                                        "blend_lowrank_file product tiles");
    std::vector<const unsigned char*> ptrs(n);
    uint64_t t;
    while (q.pop(&t)) {
      const uint64_t r0 = t * rows_per_task;
      const uint64_t m = std::min(rows_per_task, rows - r0);
      r.load(r0 * cols, m * cols);
      recoverable([&] {
        for (uint64_t g0 = 0; g0 < m; g0 += kLrBlockRows) {
          const size_t RB = static_cast<size_t>(std::min<uint64_t>(kLrBlockRows, m - g0));
          for (uint64_t j0 = 0; j0 < cols; j0 += kLrCols) {
            const size_t width = static_cast<size_t>(std::min<uint64_t>(kLrCols, cols - j0));
            for (size_t f = 0; f < n_f; ++f) {
              const LowRankFactor& fa = factors[f];
              float* Pf = P.get() + f * kLrBlockRows * kLrCols;
              for (size_t g = 0; g < RB; g += kLrRows)
                lowrank_tile(fa.b + (r0 + g0 + g) * fa.rank, fa.rank,
                             packed[f].get() + j0 / kLrCols * fa.rank * kLrCols, kLrCols,
                             std::min(kLrRows, RB - g), width, Pf + g * kLrCols, kLrCols);
            }
            const uint64_t e = g0 * cols + j0;  // element offset inside the chunk
            for (size_t i = 0; i < n; ++i) ptrs[i] = r.in()[i] + e * dtype_size(in_dt[i]);
            lowrank_blend_tile(n, ptrs.data(), in_dt.data(), w.data(), n_f, P.get(), c.data(),
                               r.out() + e * dtype_size(out_dt), out_dt, RB, width,
                               static_cast<size_t>(cols));
          }
        }
      });
      r.store(r0 * cols, m * cols);
    }
  });
  files.check_mapped_inputs(numel);
}

}  // namespace lsf
