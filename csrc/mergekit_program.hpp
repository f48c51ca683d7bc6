// The per-element work of the mergekit methods (layerswap_fast/engine/mergekit_ops.py): a short
// program of float32 steps run over blocks of the streamed inputs, each step the numpy/torch
// operation it replaces, so the bytes equal the Python emulation's. Besides the output it can
// produce torch-ordered sums and norms, magnitude histograms, counts of one magnitude per chunk,
// and masks by magnitude rank. No Python here; everything throws lsf::CoreErr.
#pragma once

#include <cstdint>
#include <vector>

#include "common.hpp"
#include "io.hpp"

namespace lsf {

// Opcodes; an instruction is {op, d, a, b, c} (see mergekit_program.cpp for each one's meaning).
enum MkOp : int32_t {
  kMkLoad = 0, kMkRound, kMkAdd, kMkSub, kMkMul, kMkDiv, kMkAddK, kMkMulK, kMkDivK, kMkKDiv,
  kMkKSub, kMkFma64, kMkAbs, kMkSign, kMkMaxK, kMkClipK, kMkMajority, kMkEq, kMkUniformLt,
  kMkStore, kMkNorm, kMkSum, kMkConst, kMkZeroToOne, kMkHistHigh, kMkHistLow, kMkEqCount,
  kMkRank, kMkSum64, kMkVarPop, kMkDellaLt, kMkMaskOut, kMkMaskIn, kMkCount
};

struct MkInstr {
  int32_t op, d, a, b, c;
};

// A band of descending magnitude ranks [lo, hi) of one register (see kMkRank).
struct MkRank {
  uint32_t top = 0, bottom = 0;  // float32 bit patterns of |x| at ranks lo and hi - 1
  uint64_t lo = 0, hi = 0;
  std::vector<uint32_t> values;   // the magnitudes whose ties are counted (top, bottom)
  std::vector<uint64_t> greater;  // how many magnitudes exceed each
  std::vector<uint64_t> seen;     // per task x value: equal magnitudes in the tasks before
};

// A bit per element of the tensor (element e: bit e % 8 of byte e / 8), zeroed by the caller,
// which MaskOut sets and MaskIn reads: a mask one pass computes and a later one reuses.
struct MkMask {
  unsigned char* bits = nullptr;
  uint64_t bytes = 0;
};

struct MkResult {
  std::vector<double> sums;       // tasks x sum slots
  std::vector<int64_t> hists;     // hist slots x 65536
  std::vector<int64_t> eqcounts;  // tasks x count slots
  // With keep_tasks: per hist slot x task, the task's non-zero bins as (bin << 32 | count); a
  // slot flagged in task_overflow (a task with too many distinct bins) has none.
  std::vector<std::vector<uint64_t>> task_hists;
  std::vector<char> task_overflow;  // per hist slot
  uint64_t tasks = 0;
};

// Runs `code` over elements [0, numel) of the inputs in tasks of `segment` elements, each the
// extent of every torch-ordered sum or norm and read by one worker in chunks of `chunk` elements,
// writing kMkStore's register to out (when not null) at out_offset. index_base is added to the
// element indices drawn by kMkUniformLt. keep_tasks: each task's histograms too (task_hists), so
// that a caller can count one magnitude per task after the fact. whole_sums: the Sum and Norm slots
// (the program's only sums) are each one over the whole tensor in torch's order, computed by all
// workers over segments (of whole groups, TorchSum::group, where there is a Sum; a Norm's
// segments added in order) and returned in row 0 of sums. keep_mapped (a program without output):
// the mapped inputs' pages stay mapped for the next pass over the tensor, which drops them (a
// pass that writes), when the inputs hold at most kKeepMappedBytes of the tensor.
MkResult mk_program_run(const std::vector<FileSlice>& in, const std::vector<DType>& in_dt,
                        uint64_t numel, const std::vector<MkInstr>& code,
                        const std::vector<double>& consts, const std::vector<uint64_t>& ints,
                        const std::vector<MkRank>& ranks, ShardWriter* out, uint64_t out_offset,
                        DType out_dt, uint64_t chunk, uint64_t segment, uint64_t index_base,
                        int64_t threads, bool keep_tasks = false,
                        const std::vector<MkMask>& masks = {}, bool whole_sums = false,
                        bool keep_mapped = false);

// whole_sums with Norm slots: the most operands a worker keeps of one segment, over all slots.
inline constexpr uint64_t kWholeNormElems = uint64_t{1} << 22;

// Testing hook: false makes MaskOut and MaskIn take their portable form, not AVX-512.
void set_mask_simd_enabled(bool enabled);

}  // namespace lsf
