// Internals of the TIES kernels shared by their files: ties_select.cpp (passes 1 and 2: the
// thresholds by radix select), ties_merge.cpp (pass 3: the merge loops, portable and AVX-512),
// ties_bracket.cpp (the one pass over a sampled bracket) and ties.cpp (the entry points). The
// algorithm is described in ties.hpp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "chunk_reader.hpp"
#include "common.hpp"
#include "kernel_util.hpp"

namespace lsf {
namespace ties_detail {

constexpr size_t kBlk = 1024;            // elements per block (float32 scratch per thread)
constexpr uint32_t kAbsMask = 0x7FFFFFFFu;
// Heavy patterns per expert of the one-pass bracket (see ties_bracket.cpp).
constexpr size_t kMaxHeavy = 4;
constexpr uint32_t kNoPattern = 0xFFFFFFFFu;  // no |d| pattern (their sign bit is 0)

// One expert's bracket in a pass 3: patterns in [lo, hi] are flagged for recording, except the
// kMaxHeavy "heavy" patterns (values many elements share, as in 16-bit checkpoints; unused slots
// hold 0xFFFFFFFF, which no |d| pattern equals), which are counted instead.
struct BracketSide {
  uint32_t lo, hi;
  const uint32_t* heavy;  // kMaxHeavy patterns
  uint64_t* above;        // += patterns above hi
  uint64_t* counts;       // [k] += patterns equal to heavy[k]
};

// Per-thread scratch: float32 blocks (base, sum, num, n_trimmed trimmed deltas), int32 blocks,
// a block of |d| patterns and n_keys blocks of pass-1 keys.
class Scratch {
 public:
  explicit Scratch(size_t n_trimmed, size_t n_keys = 0)
      : f_(alloc_array<float>(static_cast<uint64_t>(n_trimmed + 3) * kBlk, "ties scratch")),
        i_(alloc_array<int32_t>(2 * kBlk, "ties scratch")),
        u_(alloc_array<uint32_t>(kBlk, "ties scratch")),
        k_(alloc_array<uint16_t>(static_cast<uint64_t>(n_keys) * kBlk + 1, "ties scratch")) {}
  float* base() { return f_.get(); }
  float* sum() { return f_.get() + kBlk; }
  float* num() { return f_.get() + 2 * kBlk; }
  float* t(size_t e) { return f_.get() + (3 + e) * kBlk; }
  int32_t* gamma() { return i_.get(); }
  int32_t* cnt() { return i_.get() + kBlk; }
  uint32_t* bits() { return u_.get(); }
  uint16_t* keys(size_t e) { return k_.get() + e * kBlk; }

 private:
  Array<float> f_;
  Array<int32_t> i_;
  Array<uint32_t> u_;
  Array<uint16_t> k_;
};

// ---- element sources ---------------------------------------------------------------------------

// One thread's access to elements [e0, e0 + m) of the base, the experts and the output.
class Chunks {
 public:
  virtual ~Chunks() = default;
  // Point base and ex[e] at element e0 of the task (FileChunks reads only the experts flagged in
  // `use`; ex[e] of the others stays null).
  virtual void load(uint64_t e0, uint64_t m) = 0;
  virtual unsigned char* out_begin(uint64_t e0) = 0;
  virtual void out_end(uint64_t e0, uint64_t m) = 0;
  const unsigned char* base = nullptr;
  std::vector<const unsigned char*> ex;
};

struct Job {
  DType bdt;
  std::vector<DType> edt;
  uint64_t numel;
  uint64_t task;  // elements per task
  int64_t threads;
  // A per-thread source reading the experts flagged in `use`; with an output buffer if `out`.
  std::function<std::unique_ptr<Chunks>(const std::vector<char>& use, bool out)> make;
};

struct Thresholds {
  std::vector<float> tau;    // the reported threshold per expert
  std::vector<uint32_t> thr; // keep iff the pattern of |d| >= thr
};

// ---- passes 1 and 2 (ties_select.cpp) ----------------------------------------------------------

// Each expert's tau (see ties_thresholds_buffers_run) and the pattern it keeps from.
Thresholds select_thresholds(const Job& job, uint64_t keep);

// Thresholds from the bit patterns of the taus.
Thresholds make_thresholds(const std::vector<uint32_t>& tau_bits);

// u = the |d| patterns of n consecutive elements of one expert.
void abs_bits_range(const unsigned char* base, DType bdt, const unsigned char* ex, DType edt,
                    size_t n, uint32_t* u, Scratch& sc);

// ---- pass 3 (ties_merge.cpp) -------------------------------------------------------------------

// Pass 3: trim, elect, disjoint mean and output for n consecutive elements; with sides, also the
// bracket test: flags[j] = 1 where some expert's |d| pattern lies in its bracket and is not one of
// its heavy patterns (n bytes), and each side's counts.
void ties_range(const unsigned char* base, DType bdt, size_t n_ex, const unsigned char* const* ex,
                const DType* edt, const uint32_t* thr, float lam, unsigned char* out, DType odt,
                size_t n, Scratch& sc, const BracketSide* sides = nullptr,
                uint8_t* flags = nullptr);

// Threads of a pass over job: at most one per task.
inline size_t pass_threads(const Job& job) {
  return resolve_threads(job.threads, (job.numel + job.task - 1) / job.task);
}

// Runs on each chunk of pass 3 (thread slot, first element, elements, the chunk's inputs) once
// its output is written; false stops the pass.
using AfterChunk = std::function<bool(size_t, uint64_t, uint64_t, const Chunks&)>;

// The bracket test a pass 3 does besides the merge: per thread slot, each expert's side and a
// flag byte per element of a chunk (with 8 more, zeroed, so collect can read whole words).
struct ChunkBracket {
  std::vector<std::vector<BracketSide>> sides;
  std::vector<Array<uint8_t>> flags;
};

// Pass 3 over job: the output under th; after and bracket as above, when given.
void merge_pass(const Job& job, const Thresholds& th, float lam, DType odt,
                const AfterChunk& after = nullptr, ChunkBracket* bracket = nullptr);

// ---- the one pass over a sampled bracket (ties_bracket.cpp) ------------------------------------

// ties_file in one pass when it can; false when the exact passes must (re)write the output.
bool ties_one_pass(const Job& job, const StreamFiles& files, uint64_t keep, float lam,
                   uint64_t record_budget);

}  // namespace ties_detail
}  // namespace lsf
