// mergekit's per-element steps as a program over blocks of streamed inputs (see the header).
//
// Instructions, registers r (blocks of float32), constants k (doubles), integers n:
//   Load d a        r[d] = float32(input a)
//   Round d a b     r[d] = r[a] rounded to nearest even in b (0: float32, 1: BF16, 2: F16)
//   Add/Sub/Mul/Div d a b c  r[d] = r[a] op r[b] (float32), then rounded as Round's c when given
//   AddK/MulK/DivK d a b c   r[d] = r[a] op float32(k[b]);  KDiv: k[b] / r[a];  KSub: k[b] - r[a];
//                            rounded likewise
//   Fma64 d a b c   r[d] = float32(double(r[a]) + double(r[b]) * k[c])
//   Abs, Sign (numpy's: ±0 -> +0, NaN stays), Majority (x >= 0 ? 1 : -1), ZeroToOne (0 -> 1) d a
//   MaxK d a b      numpy maximum(r[a], k[b]);  ClipK d a b c: numpy clip(r[a], k[b], k[c])
//   Eq d a b        r[a] == r[b] ? 1 : 0
//   UniformLt d a b (uniform(n[a], element) < k[b]) ? 1 : 0, the counter stream of
//                   layerswap_fast/engine/counter_random.py
//   Const d a       r[d] = float32(k[a])
//   Store a         the output's elements = r[a] in the output dtype
//   Norm a b / Sum a b   r[a] into sum slot b: torch's float32 vector norm / sum order over the
//                   task (engine/torch_rounding.py's TorchNorm / TorchSum, step for step)
//   Sum64 a b       r[a] into sum slot b: a float64 sum over the task, element e of the task
//                   into lane e % 8, each lane in element order, the lanes added in order at
//                   the end (engine/mergekit_ops.py's lane_sum)
//   VarPop d a b    r[d] = float32 of the population variance of r[a], ..., r[a + b - 1] by
//                   Welford's updates in float64 (torch.var(dim=0, unbiased=False) on the CPU)
//   HistHigh a b    histogram b counts the high 16 bits of bits(|r[a]|)
//   HistLow a b c   histogram b counts the low 16 bits of bits(|r[a]|) whose high bits are n[c]
//   EqCount a b c   count slot b of the task counts bits(|r[a]|) == n[c]
//   Rank d a b      r[d] = 1 where |r[a]|'s descending rank lies in ranks[b]'s band (ties in
//                   element order), else 0
//   DellaLt d a b c r[d] = (uniform(n[b], element) < k[c] - k[c + 1] + rank / (cols - 1) * 2 *
//                   k[c + 1]) ? 1 : 0, rank the ascending rank of |r[a]| within its row of
//                   cols = n[b + 1] elements (ties in element order): DELLA's keep probabilities.
//                   A program holding it runs in blocks of whole rows (chunks and segments must
//                   be whole rows too).
//   MaskOut a b     mask b's bit of each element = (r[a] != 0)
//   MaskIn d a      r[d] = mask a's bit of each element (1 or 0)
#include "mergekit_program.hpp"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cmath>
#include <cstring>
#include <mutex>
#include <string>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "chunk_reader.hpp"
#include "kernel_util.hpp"
#include "mapped.hpp"
#include "numerics.hpp"

namespace lsf {

namespace {

constexpr size_t kB = 512;  // elements per block (registers stay in L1)
constexpr int kMaxRegs = 64;
constexpr size_t kMaxCode = 4096;
constexpr size_t kLanes = 8;
constexpr size_t kRow = 4 * kLanes;
constexpr size_t kHistWords = 2 * 65536;  // a task's histogram, in two halves (see kMkHistHigh)

// ---- torch's reduction orders --------------------------------------------------------------------

struct TorchSum {
  uint64_t n = 0, seen = 0, rows = 0, power = 0, step = 0, done_rows = 0, buffered = 0, nrest = 0;
  float acc[4][kRow];
  float rest[kRow];
  float* buf = nullptr;  // step rows of the block being filled
  // Set when this sum is one part of a sum over n elements (mk_program_run's whole_sums): the
  // sums that torch adds into its last level, in order, kRow floats each, go here instead.
  std::vector<float>* last_level = nullptr;

  // The sum of n elements, fed from element `start` on (a multiple of group(), or 0).
  void init(uint64_t count, float* storage, uint64_t start = 0, std::vector<float>* last_level_out = nullptr) {
    n = count;
    seen = start;
    done_rows = start / kRow;
    buffered = nrest = 0;
    rows = n / kRow;
    const uint64_t bits = rows > 1 ? 64 - static_cast<uint64_t>(__builtin_clzll(rows - 1)) : 0;
    power = std::max<uint64_t>(4, bits / 4);
    step = uint64_t{1} << power;
    buf = storage;
    last_level = last_level_out;
    std::memset(acc, 0, sizeof acc);
  }
  // Elements that torch sums on their own before adding them to its last level: parts of a sum
  // that start at multiples of it can be summed apart and their last levels added in order.
  uint64_t group() const { return (uint64_t{1} << (3 * power)) * kRow; }
  void block() {
    float s[kRow];
    for (size_t l = 0; l < kRow; ++l) s[l] = buf[l];
    for (uint64_t r = 1; r < step; ++r)
      for (size_t l = 0; l < kRow; ++l) s[l] = s[l] + buf[r * kRow + l];
    for (size_t l = 0; l < kRow; ++l) acc[0][l] = acc[0][l] + s[l];
    done_rows += step;
    for (uint64_t j = 1; j < 4; ++j) {
      if (j == 3 && last_level) {
        last_level->insert(last_level->end(), acc[2], acc[2] + kRow);
        std::memset(acc[2], 0, sizeof acc[2]);
        break;
      }
      for (size_t l = 0; l < kRow; ++l) {
        acc[j][l] = acc[j][l] + acc[j - 1][l];
        acc[j - 1][l] = 0.f;
      }
      if (done_rows & ((step - 1) << (j * power))) break;
    }
    buffered = 0;
  }
  void add(const float* x, size_t m) {
    const uint64_t body = rows * kRow;
    while (m > 0 && seen < body) {
      const uint64_t take = std::min<uint64_t>({m, body - seen, step * kRow - buffered});
      std::memcpy(buf + buffered, x, take * sizeof(float));
      buffered += take;
      seen += take;
      x += take;
      m -= take;
      if (buffered == step * kRow) block();
    }
    for (size_t j = 0; j < m; ++j) rest[nrest++] = x[j];
    seen += m;
  }
  float total() const {
    if (n < kLanes) {
      float p[4] = {0.f, 0.f, 0.f, 0.f};
      const uint64_t whole = nrest / 4 * 4;
      for (uint64_t i = 0; i < whole; i += 4)
        for (int l = 0; l < 4; ++l) p[l] = p[l] + rest[i + l];
      for (uint64_t i = whole; i < nrest; ++i) p[0] = p[0] + rest[i];
      float t = p[0];
      for (int l = 1; l < 4; ++l) t = t + p[l];
      return t;
    }
    float a0[kRow];
    for (size_t l = 0; l < kRow; ++l) a0[l] = acc[0][l];
    for (uint64_t r = 0; r < buffered / kRow; ++r)
      for (size_t l = 0; l < kRow; ++l) a0[l] = a0[l] + buf[r * kRow + l];
    for (int j = 1; j < 4; ++j)
      for (size_t l = 0; l < kRow; ++l) a0[l] = a0[l] + acc[j][l];
    const uint64_t vectors = nrest / kLanes;
    for (uint64_t i = 0; i < vectors; ++i)
      for (size_t l = 0; l < kLanes; ++l) a0[l] = a0[l] + rest[i * kLanes + l];
    float lanes[kLanes];
    for (size_t l = 0; l < kLanes; ++l) lanes[l] = a0[l] + a0[kLanes + l];
    for (size_t k = 2; k < 4; ++k)
      for (size_t l = 0; l < kLanes; ++l) lanes[l] = lanes[l] + a0[k * kLanes + l];
    float t = 0.f;
    for (uint64_t i = vectors * kLanes; i < nrest; ++i) t = t + rest[i];
    for (size_t l = 0; l < kLanes; ++l) t = t + lanes[l];
    return t;
  }
};

// Sum64's float64 sum: eight independent chains (one add's latency per eight elements, not per
// element), each still in element order, so the result is defined and the same on every machine.
struct LaneSum {
  double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  uint64_t seen = 0;

  void add(const float* x, size_t m) {
    size_t j = 0;
    for (; j < m && (seen + j) % 8 != 0; ++j) lane[(seen + j) % 8] += static_cast<double>(x[j]);
    double l[8];
    for (size_t k = 0; k < 8; ++k) l[k] = lane[k];
    for (; j + 8 <= m; j += 8)
      for (size_t k = 0; k < 8; ++k) l[k] += static_cast<double>(x[j + k]);
    for (size_t k = 0; j + k < m; ++k) l[k] += static_cast<double>(x[j + k]);
    for (size_t k = 0; k < 8; ++k) lane[k] = l[k];
    seen += m;
  }
  double total() const {
    double t = lane[0];
    for (size_t k = 1; k < 8; ++k) t += lane[k];
    return t;
  }
};

struct TorchNorm {
  uint64_t whole = 0, seen = 0, ncarry = 0, ntail = 0;
  float lanes[kLanes], carry[kLanes], tail[kLanes];

  void init(uint64_t n) {
    whole = n - n % kLanes;
    seen = ncarry = ntail = 0;
    for (size_t l = 0; l < kLanes; ++l) lanes[l] = 0.f;
  }
  void add(const float* x, size_t m) {
    size_t j = 0;
    while (j < m && seen < whole && ncarry != 0) {
      carry[ncarry++] = x[j++];
      ++seen;
      if (ncarry == kLanes) {
        for (size_t l = 0; l < kLanes; ++l) lanes[l] = lanes[l] + carry[l] * carry[l];
        ncarry = 0;
      }
    }
    // in a local copy: stores to the member could alias x, which would keep every lane in memory
    float acc[kLanes];
    for (size_t l = 0; l < kLanes; ++l) acc[l] = lanes[l];
    while (j + kLanes <= m && seen + kLanes <= whole) {
      for (size_t l = 0; l < kLanes; ++l) {
        const float v = x[j + l];
        acc[l] = acc[l] + v * v;
      }
      j += kLanes;
      seen += kLanes;
    }
    for (size_t l = 0; l < kLanes; ++l) lanes[l] = acc[l];
    for (; j < m; ++j, ++seen) {
      if (seen < whole) {
        carry[ncarry++] = x[j];
        if (ncarry == kLanes) {
          for (size_t l = 0; l < kLanes; ++l) lanes[l] = lanes[l] + carry[l] * carry[l];
          ncarry = 0;
        }
      } else {
        tail[ntail++] = x[j];
      }
    }
  }
  float total() const {
    float t = lanes[0];
    for (size_t l = 1; l < kLanes; ++l) t = t + lanes[l];
    for (uint64_t i = 0; i < ntail; ++i)
      t = static_cast<float>(static_cast<double>(t) +
                             static_cast<double>(tail[i]) * static_cast<double>(tail[i]));
    return std::sqrt(t);
  }
};

// ---- validation ------------------------------------------------------------------------------------

enum Kind : char { R = 'r', I = 'i', K = 'k', N = 'n', S = 's', H = 'h', C = 'c', X = 'x', D = 't', Q = 'q', O = 'o', M = 'm', U = '_' };

const char* field_kinds(int32_t op) {
  switch (op) {
    case kMkLoad: return "ri__";
    case kMkRound: return "rrt_";
    case kMkAdd: case kMkSub: case kMkMul: case kMkDiv: return "rrro";
    case kMkEq: return "rrr_";
    case kMkAddK: case kMkMulK: case kMkDivK: case kMkKDiv: case kMkKSub: return "rrko";
    case kMkMaxK: return "rrk_";
    case kMkFma64: return "rrrk";
    case kMkAbs: case kMkSign: case kMkMajority: case kMkZeroToOne: return "rr__";
    case kMkClipK: return "rrkk";
    case kMkUniformLt: return "rnk_";
    case kMkStore: return "_r__";
    case kMkNorm: case kMkSum: case kMkSum64: return "_rs_";
    case kMkConst: return "rk__";
    case kMkHistHigh: return "_rh_";
    case kMkHistLow: return "_rhn";
    case kMkEqCount: return "_rcn";
    case kMkRank: return "rrx_";
    case kMkVarPop: return "rrq_";
    case kMkDellaLt: return "rrnk";
    case kMkMaskOut: return "_rm_";
    case kMkMaskIn: return "rm__";
    default: return nullptr;
  }
}

struct Shape {
  int regs = 0;
  size_t sums = 0, hists = 0, counts = 0;
  std::vector<char> slot_kind;  // per sum slot: 1 sum, 2 norm, 3 float64 sum
  size_t norm_slots = 0;
  bool stores = false;
};

Shape check_code(const std::vector<MkInstr>& code, size_t n_in, size_t n_k, size_t n_n,
                 size_t n_ranks, size_t n_masks) {
  if (code.size() > kMaxCode) fail("mk_program: more than " + std::to_string(kMaxCode) + " instructions");
  Shape s;
  std::vector<int> slot_kind;  // 0 unused, 1 sum, 2 norm, 3 float64 sum
  for (size_t i = 0; i < code.size(); ++i) {
    const MkInstr& in = code[i];
    const char* kinds = field_kinds(in.op);
    const std::string where = "mk_program: instruction " + std::to_string(i);
    if (!kinds) fail(where + " has unknown opcode " + std::to_string(in.op));
    const int32_t f[4] = {in.d, in.a, in.b, in.c};
    for (int j = 0; j < 4; ++j) {
      const int32_t v = f[j];
      const char k = kinds[j];
      if (k == U || (k == O && v == -1)) continue;
      if (v < 0) fail(where + ": operand " + std::to_string(j) + " is negative");
      const size_t u = static_cast<size_t>(v);
      size_t limit = SIZE_MAX;
      switch (k) {
        case R: limit = kMaxRegs; s.regs = std::max(s.regs, v + 1); break;
        case I: limit = n_in; break;
        case K: limit = n_k; break;
        case N: limit = n_n; break;
        case X: limit = n_ranks; break;
        case M: limit = n_masks; break;
        case D: case O: limit = 3; break;
        case Q:
          if (v < 1 || f[1] > kMaxRegs - v)
            fail(where + ": registers " + std::to_string(f[1]) + " + " + std::to_string(v) +
                 " run past the last one or are none");
          s.regs = std::max(s.regs, f[1] + v);
          break;
        case S: limit = 1024; s.sums = std::max(s.sums, u + 1); break;
        case H: limit = 64; s.hists = std::max(s.hists, u + 1); break;
        case C: limit = 1024; s.counts = std::max(s.counts, u + 1); break;
        default: break;
      }
      if (u >= limit)
        fail(where + ": operand " + std::to_string(j) + " is " + std::to_string(v) +
             ", not below " + std::to_string(limit));
    }
    if (in.op == kMkNorm || in.op == kMkSum || in.op == kMkSum64) {
      const size_t slot = static_cast<size_t>(in.b);
      if (slot_kind.size() <= slot) slot_kind.resize(slot + 1, 0);
      const int want = in.op == kMkNorm ? 2 : in.op == kMkSum ? 1 : 3;
      if (slot_kind[slot] && slot_kind[slot] != want)
        fail(where + ": sum slot " + std::to_string(slot) + " is fed by two kinds of sum");
      slot_kind[slot] = want;
    }
    if (in.op == kMkStore) s.stores = true;
    if (in.op == kMkDellaLt && (static_cast<size_t>(in.b) + 1 >= n_n || static_cast<size_t>(in.c) + 1 >= n_k))
      fail(where + ": DellaLt needs n[b + 1] (the row length) and k[c + 1] (epsilon)");
  }
  s.slot_kind.assign(s.sums, 0);
  for (size_t i = 0; i < slot_kind.size(); ++i) s.slot_kind[i] = static_cast<char>(slot_kind[i]);
  s.norm_slots = static_cast<size_t>(std::count(slot_kind.begin(), slot_kind.end(), 2));
  return s;
}

// ---- one block -----------------------------------------------------------------------------------

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
  z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
  return z ^ (z >> 31);
}

inline uint32_t mag_bits(float x) { return f32_to_bits(x) & UINT32_C(0x7FFFFFFF); }

struct Ctx {
  const std::vector<MkInstr>* code;
  const double* k;
  const uint64_t* n;
  const MkRank* ranks;
  size_t n_in;
  const DType* in_dt;
  DType out_dt;
  // per worker
  float* regs;    // regs x stride
  size_t stride;  // elements per block
  uint32_t* sort_scratch;  // 6 x stride: DellaLt's keys, ranks, (key, index) pairs twice
  TorchSum* sums;
  TorchNorm* norms;
  LaneSum* sums64;
  uint32_t* hists;    // this task's, hists x kHistWords
  int64_t* counts;    // this task's count slots
  uint64_t* running;  // per rank: its values' running tie counts
  const size_t* running_at;
  const MkMask* masks;
  const std::vector<std::vector<double>>* della_probs;  // per instruction: a DellaLt's della_probs
  // whole_sums with Norm slots: each Norm slot's operands of this task go to norm_out[slot] from
  // element norm_at of the task on (the slots' torch order is added up in task order after)
  float* const* norm_out;
  uint64_t norm_at;
};

// r[d] = the population variance across the nx registers from a (stride apart) over m <= kB
// elements: torch's Welford updates in float64 from zero, model by model (vectorised); a division
// by a power of two is the exact multiplication by its reciprocal, so only counts like 3 divide.
// The first update is written out (no zeroed arrays to read back), and two models, the common
// case, go in one loop with nothing kept in memory; each step is the same operation either way.
LSF_INLINE void var_pop(float* d, const float* a, size_t stride, int32_t nx, size_t m) {
  if (nx == 2) {
    const float* x1 = a + stride;
    for (size_t j = 0; j < m; ++j) {
      const double v0 = static_cast<double>(a[j]), v1 = static_cast<double>(x1[j]);
      const double mean0 = 0.0 + v0;
      const double m20 = 0.0 + v0 * (v0 - mean0);
      const double delta = v1 - mean0;
      const double mean1 = mean0 + delta * 0.5;
      d[j] = static_cast<float>((m20 + delta * (v1 - mean1)) * 0.5);
    }
    return;
  }
  double mean[kB], m2[kB];
  for (size_t j = 0; j < m; ++j) {
    const double v = static_cast<double>(a[j]);
    mean[j] = 0.0 + v;
    m2[j] = 0.0 + v * (v - mean[j]);
  }
  for (int32_t k = 1; k < nx; ++k) {
    const float* x = a + static_cast<size_t>(k) * stride;
    const double count = static_cast<double>(k + 1);
    if (((k + 1) & k) == 0) {
      const double inv = 1.0 / count;
      for (size_t j = 0; j < m; ++j) {
        const double v = static_cast<double>(x[j]);
        const double delta = v - mean[j];
        mean[j] = mean[j] + delta * inv;
        m2[j] = m2[j] + delta * (v - mean[j]);
      }
    } else {
      for (size_t j = 0; j < m; ++j) {
        const double v = static_cast<double>(x[j]);
        const double delta = v - mean[j];
        mean[j] = mean[j] + delta / count;
        m2[j] = m2[j] + delta * (v - mean[j]);
      }
    }
  }
  const double n = static_cast<double>(nx);
  if ((nx & (nx - 1)) == 0) {
    const double inv = 1.0 / n;
    for (size_t j = 0; j < m; ++j) d[j] = static_cast<float>(m2[j] * inv);
  } else {
    for (size_t j = 0; j < m; ++j) d[j] = static_cast<float>(m2[j] / n);
  }
}

// The ascending rank of each key within keys[0, m) (ties in index order) into rank: a stable
// LSD radix sort of (key, index) pairs by bytes, skipping the bytes every key shares (bfloat16
// magnitudes share their low two). Each pass counts and scatters kStreams quarters of the input
// interleaved, each quarter with its own counters placed after the earlier quarters' in every
// bucket: consecutive equal bytes (a row's exponents mostly are) then form kStreams independent
// chains of counter increments instead of one. pairs holds 2 x m.
inline void stable_ranks(const uint32_t* keys, uint32_t m, uint32_t* rank, uint64_t* pairs) {
  constexpr uint32_t kStreams = 4;
  uint64_t* src = pairs;
  uint64_t* dst = pairs + m;
  uint32_t all_or = 0, all_and = ~0u;
  for (uint32_t j = 0; j < m; ++j) {
    all_or |= keys[j];
    all_and &= keys[j];
    src[j] = (static_cast<uint64_t>(keys[j]) << 32) | j;
  }
  const uint32_t varying = all_or ^ all_and;
  const uint32_t len = m / kStreams;  // the last stream also takes the m % kStreams after
  for (int byte = 0; byte < 4; ++byte) {
    if (((varying >> (8 * byte)) & 0xFF) == 0) continue;
    const int shift = 32 + 8 * byte;
    uint32_t at[kStreams][256] = {};
    for (uint32_t i = 0; i < len; ++i)
      for (uint32_t q = 0; q < kStreams; ++q) ++at[q][(src[q * len + i] >> shift) & 0xFF];
    for (uint32_t j = kStreams * len; j < m; ++j) ++at[kStreams - 1][(src[j] >> shift) & 0xFF];
    uint32_t sum = 0;
    for (int v = 0; v < 256; ++v)
      for (uint32_t q = 0; q < kStreams; ++q) {
        const uint32_t n = at[q][v];
        at[q][v] = sum;
        sum += n;
      }
    for (uint32_t i = 0; i < len; ++i)
      for (uint32_t q = 0; q < kStreams; ++q) {
        const uint64_t x = src[q * len + i];
        dst[at[q][(x >> shift) & 0xFF]++] = x;
      }
    for (uint32_t j = kStreams * len; j < m; ++j) dst[at[kStreams - 1][(src[j] >> shift) & 0xFF]++] = src[j];
    std::swap(src, dst);
  }
  for (uint32_t j = 0; j < m; ++j) rank[static_cast<uint32_t>(src[j])] = j;
}

// The same ranks as stable_ranks by counting, when the row's keys fall in few bins: keys share
// their low zero bits (a bfloat16 magnitude's sixteen, a float16's thirteen) and a row's non-zero
// magnitudes span a few exponents, so one bin per key value in that span (and one for zero) makes
// a histogram whose running starts are the ranks. keys is overwritten with the bins; hist holds
// cap counters. False, with keys and rank untouched, when the span needs more.
inline bool counting_ranks(uint32_t* keys, uint32_t m, uint32_t* rank, uint32_t* hist, uint32_t cap) {
  uint32_t all_or = 0, top = 0, low_nz_less = ~0u;  // the least non-zero key - 1 (zero wraps)
  for (uint32_t j = 0; j < m; ++j) {
    all_or |= keys[j];
    top = std::max(top, keys[j]);
    low_nz_less = std::min(low_nz_less, keys[j] - 1u);
  }
  if (all_or == 0) {  // all zero: ranks in index order
    for (uint32_t j = 0; j < m; ++j) rank[j] = j;
    return true;
  }
  const int shift = __builtin_ctz(all_or);
  const uint32_t lo = (low_nz_less + 1u) >> shift;
  const uint64_t bins = static_cast<uint64_t>((top >> shift) - lo) + 2;  // bin 0: zero
  if (bins > cap) return false;
  for (uint32_t j = 0; j < m; ++j) keys[j] = keys[j] == 0 ? 0u : (keys[j] >> shift) - lo + 1;
  std::fill(hist, hist + bins, 0u);
  for (uint32_t j = 0; j < m; ++j) ++hist[keys[j]];
  uint32_t sum = 0;
  for (uint64_t b = 0; b < bins; ++b) {
    const uint32_t n = hist[b];
    hist[b] = sum;
    sum += n;
  }
  for (uint32_t j = 0; j < m; ++j) rank[j] = hist[keys[j]]++;
  return true;
}

// DellaLt's keep probability of each rank in a row of cols (see the top), computed once per
// instruction: the division per element would cost more than the rest of the comparison.
std::vector<double> della_probs(uint64_t cols, double density, double eps) {
  std::vector<double> prob(cols);
  const double low = density - eps;
  const double span = cols > 1 ? static_cast<double>(cols - 1) : 1.0;
  const double scale = cols > 1 ? 1.0 : 0.0;  // one column: rank 0, norm 0
  for (uint64_t r = 0; r < cols; ++r) {
    const double norm = static_cast<double>(r) * scale / span;
    prob[r] = low + norm * 2.0 * eps;
  }
  return prob;
}

// DellaLt over m elements (whole rows of cols) starting at element e0 with prob = della_probs':
// the ranks, then draw and comparison in one loop without branches (a draw below its
// probability is a coin toss, which no branch predicts).
LSF_CLONES
void della_lt(float* d, const float* a, size_t m, uint64_t key, uint64_t cols, const double* prob,
              uint64_t e0, uint32_t* scratch) {
  uint32_t* keys = scratch;
  uint32_t* rank = scratch + cols;
  uint64_t* pairs = reinterpret_cast<uint64_t*>(scratch + 2 * cols);  // 2 x cols
  for (size_t r0 = 0; r0 < m; r0 += cols) {
    for (size_t j = 0; j < cols; ++j) keys[j] = mag_bits(a[r0 + j]);
    if (!counting_ranks(keys, static_cast<uint32_t>(cols), rank, reinterpret_cast<uint32_t*>(pairs),
                        static_cast<uint32_t>(4 * cols)))
      stable_ranks(keys, static_cast<uint32_t>(cols), rank, pairs);
    for (size_t j = 0; j < cols; ++j) {
      const uint64_t z = mix64(key + (e0 + r0 + j + 1) * UINT64_C(0x9E3779B97F4A7C15));
      const double draw = static_cast<double>(static_cast<int64_t>(z >> 11)) * 0x1p-53;
      d[r0 + j] = static_cast<float>(draw < prob[rank[j]]);
    }
  }
}

// d[j] = f(j), rounded to nearest even in rc (1: BF16, 2: F16; else kept in float32): an op and
// the rounding after it in one loop.
template <class F>
LSF_INLINE void emit(float* __restrict d, size_t m, int32_t rc, F f) {
  if (rc == 1) {
    for (size_t j = 0; j < m; ++j) d[j] = bf16_to_f32(f32_to_bf16(f(j)));
  } else if (rc == 2) {
    for (size_t j = 0; j < m; ++j) d[j] = f16_to_f32(f32_to_f16(f(j)));
  } else {
    for (size_t j = 0; j < m; ++j) d[j] = f(j);
  }
}

// Rank d a b (see the top). The band's values are the magnitudes on its edges (ranks lo and
// hi - 1), outside the strict band top > |x| > bottom; the equal magnitudes of a value rank
// greater + their running count in element order, so those kept are the running counts in
// [lo - greater, hi - greater). Within a block they are all kept or all dropped except in the one
// block per value and segment where the running count crosses an end: only there does the
// element order matter, and only there is the loop scalar.
LSF_INLINE void rank_band(const Ctx& c, const MkInstr& ins, float* __restrict d, const float* a, size_t m) {
  const MkRank& r = c.ranks[ins.b];
  const uint32_t top = r.top, bottom = r.bottom;
  for (size_t j = 0; j < m; ++j) {
    const uint32_t key = mag_bits(a[j]);
    d[j] = (key > bottom && key < top) ? 1.f : 0.f;
  }
  uint64_t* run = c.running + c.running_at[ins.b];
  for (size_t v = 0; v < r.values.size(); ++v) {
    const uint32_t value = r.values[v];
    uint32_t count = 0;
    for (size_t j = 0; j < m; ++j) count += mag_bits(a[j]) == value;
    if (count == 0) continue;
    const uint64_t g = r.greater[v];
    const uint64_t first = r.lo > g ? r.lo - g : 0, last = r.hi > g ? r.hi - g : 0;
    const uint64_t at = run[v];
    run[v] = at + count;
    if (at >= first && at + count <= last) {
      for (size_t j = 0; j < m; ++j) d[j] = mag_bits(a[j]) == value ? 1.f : d[j];
    } else if (at < last && at + count > first) {
      uint64_t k = at;
      for (size_t j = 0; j < m; ++j)
        if (mag_bits(a[j]) == value) {
          d[j] = k >= first && k < last ? 1.f : 0.f;
          ++k;
        }
    }  // else none kept: outside the strict band, d is 0 there already
  }
}

std::atomic<bool> g_mask_simd{true};

#if defined(__x86_64__) && defined(__GNUC__)
bool mask_simd() { return cpu_has_avx512() && g_mask_simd.load(std::memory_order_relaxed); }

// Bit i of the result: a[i] != 0 (NaN too), for 64 elements.
LSF_AVX512 uint64_t nonzero_bits64(const float* a) {
  uint64_t w = 0;
  for (int q = 0; q < 4; ++q)
    w |= static_cast<uint64_t>(_mm512_cmp_ps_mask(_mm512_loadu_ps(a + 16 * q), _mm512_setzero_ps(), _CMP_NEQ_UQ))
         << (16 * q);
  return w;
}

// d[i] = bit i of w, as 1 or 0, for 64 elements.
LSF_AVX512 void bits64_to_floats(uint64_t w, float* d) {
  for (int q = 0; q < 4; ++q)
    _mm512_storeu_ps(d + 16 * q, _mm512_maskz_mov_ps(static_cast<__mmask16>(w >> (16 * q)), _mm512_set1_ps(1.f)));
}
#else
bool mask_simd() { return false; }
uint64_t nonzero_bits64(const float*) { return 0; }
void bits64_to_floats(uint64_t, float*) {}
#endif

// Mask bits of elements [e0, e0 + m) from a: whole bytes stored (64 bits at once with AVX-512
// where the block is aligned to bytes), the bytes it shares with the blocks beside it (which other
// workers may be filling) or-ed in atomically.
void mask_out(const MkMask& mask, const float* a, size_t m, uint64_t e0) {
  const bool simd = mask_simd();
  size_t j = 0;
  while (j < m) {
    const uint64_t e = e0 + j;
    if (simd && e % 8 == 0 && m - j >= 64) {
      const uint64_t w = nonzero_bits64(a + j);
      std::memcpy(mask.bits + e / 8, &w, sizeof w);
      j += 64;
      continue;
    }
    const size_t take = std::min<size_t>(m - j, 8 - e % 8);
    unsigned char byte = 0;
    for (size_t i = 0; i < take; ++i) byte |= static_cast<unsigned char>((a[j + i] != 0.f) << ((e + i) % 8));
    unsigned char* at = mask.bits + e / 8;
    if (take == 8) *at = byte;
    else __atomic_fetch_or(at, byte, __ATOMIC_RELAXED);
    j += take;
  }
}

// Whole bytes at a time where the block is aligned to them (eight bits, no index arithmetic each;
// 64 at once with AVX-512).
void mask_in(const MkMask& mask, float* d, size_t m, uint64_t e0) {
  const auto bit = [&](size_t j) { return static_cast<float>((mask.bits[(e0 + j) / 8] >> ((e0 + j) % 8)) & 1); };
  size_t j = 0;
  for (; j < m && (e0 + j) % 8; ++j) d[j] = bit(j);
  if (mask_simd()) {
    for (; j + 64 <= m; j += 64) {
      uint64_t w;
      std::memcpy(&w, mask.bits + (e0 + j) / 8, sizeof w);
      bits64_to_floats(w, d + j);
    }
  }
  for (; j + 8 <= m; j += 8) {
    const unsigned byte = mask.bits[(e0 + j) / 8];
    for (unsigned i = 0; i < 8; ++i) d[j + i] = static_cast<float>((byte >> i) & 1);
  }
  for (; j < m; ++j) d[j] = bit(j);
}

// Steps [first, last) over m elements of a block, from element off of its registers (e0 is the
// first one's index, in and out point at it).
LSF_CLONES
void run_block(const Ctx& c, const unsigned char* const* in, unsigned char* out, size_t m, uint64_t e0,
               const MkInstr* first, const MkInstr* last, size_t off) {
  float* const regs = c.regs + off;
  for (const MkInstr* step = first; step != last; ++step) {
    const MkInstr& ins = *step;
    float* d = regs + static_cast<size_t>(ins.d < 0 ? 0 : ins.d) * c.stride;
    const float* a = regs + static_cast<size_t>(ins.a < 0 ? 0 : ins.a) * c.stride;
    const float* b = regs + static_cast<size_t>(ins.b < 0 ? 0 : ins.b) * c.stride;
    switch (ins.op) {
      case kMkLoad: {
        const unsigned char* p = in[ins.a];
        LSF_DTYPE_DISPATCH(c.in_dt[ins.a], DT, pass_to_f32_ahead<DT>(d, p, m));
        break;
      }
      case kMkRound:
        if (ins.b == 1) {
          for (size_t j = 0; j < m; ++j) d[j] = bf16_to_f32(f32_to_bf16(a[j]));
        } else if (ins.b == 2) {
          for (size_t j = 0; j < m; ++j) d[j] = f16_to_f32(f32_to_f16(a[j]));
        } else if (d != a) {
          std::memmove(d, a, m * sizeof(float));
        }
        break;
      case kMkAdd: emit(d, m, ins.c, [&](size_t j) { return a[j] + b[j]; }); break;
      case kMkSub: emit(d, m, ins.c, [&](size_t j) { return a[j] - b[j]; }); break;
      case kMkMul: emit(d, m, ins.c, [&](size_t j) { return a[j] * b[j]; }); break;
      case kMkDiv: emit(d, m, ins.c, [&](size_t j) { return a[j] / b[j]; }); break;
      case kMkEq: for (size_t j = 0; j < m; ++j) d[j] = a[j] == b[j] ? 1.f : 0.f; break;
      case kMkAddK: { const float v = static_cast<float>(c.k[ins.b]); emit(d, m, ins.c, [&](size_t j) { return a[j] + v; }); break; }
      case kMkMulK: { const float v = static_cast<float>(c.k[ins.b]); emit(d, m, ins.c, [&](size_t j) { return a[j] * v; }); break; }
      case kMkDivK: { const float v = static_cast<float>(c.k[ins.b]); emit(d, m, ins.c, [&](size_t j) { return a[j] / v; }); break; }
      case kMkKDiv: { const float v = static_cast<float>(c.k[ins.b]); emit(d, m, ins.c, [&](size_t j) { return v / a[j]; }); break; }
      case kMkKSub: { const float v = static_cast<float>(c.k[ins.b]); emit(d, m, ins.c, [&](size_t j) { return v - a[j]; }); break; }
      case kMkFma64: {
        const float* x = regs + static_cast<size_t>(ins.b) * c.stride;
        const double w = c.k[ins.c];
        for (size_t j = 0; j < m; ++j)
          d[j] = static_cast<float>(static_cast<double>(x[j]) * w + static_cast<double>(a[j]));
        break;
      }
      case kMkAbs: for (size_t j = 0; j < m; ++j) d[j] = std::fabs(a[j]); break;
      case kMkSign:
        for (size_t j = 0; j < m; ++j) {
          const float x = a[j];
          d[j] = x > 0.f ? 1.f : x < 0.f ? -1.f : x == 0.f ? 0.f : x;
        }
        break;
      case kMkMajority: for (size_t j = 0; j < m; ++j) d[j] = a[j] >= 0.f ? 1.f : -1.f; break;
      case kMkZeroToOne: for (size_t j = 0; j < m; ++j) d[j] = a[j] == 0.f ? 1.f : a[j]; break;
      case kMkMaxK: {
        const float v = static_cast<float>(c.k[ins.b]);
        for (size_t j = 0; j < m; ++j) d[j] = (a[j] != a[j] || a[j] >= v) ? a[j] : v;
        break;
      }
      case kMkClipK: {
        const float lo = static_cast<float>(c.k[ins.b]), hi = static_cast<float>(c.k[ins.c]);
        for (size_t j = 0; j < m; ++j) {
          const float x = a[j];
          d[j] = x != x ? x : x < lo ? lo : x > hi ? hi : x;
        }
        break;
      }
      case kMkUniformLt: {
        // (z >> 11) * 2^-53 < p, for the integer z >> 11 < 2^53, is z >> 11 < ceil(p * 2^53)
        // (an exact scaling): an integer compare, which vectorises.
        const uint64_t key = c.n[ins.a];
        const double scaled = c.k[ins.b] * 0x1p53;
        const int64_t below = !(scaled > 0.0)      ? 0
                              : scaled >= 0x1p53 ? (INT64_C(1) << 53)
                                                 : static_cast<int64_t>(std::ceil(scaled));
        for (size_t j = 0; j < m; ++j) {
          const uint64_t z = mix64(key + (e0 + j + 1) * UINT64_C(0x9E3779B97F4A7C15));
          d[j] = static_cast<int64_t>(z >> 11) < below ? 1.f : 0.f;
        }
        break;
      }
      case kMkConst: { const float v = static_cast<float>(c.k[ins.a]); for (size_t j = 0; j < m; ++j) d[j] = v; break; }
      case kMkStore:
        LSF_DTYPE_DISPATCH(c.out_dt, DT, for (size_t j = 0; j < m; ++j) Elem<DT>::store(out, j, a[j]));
        break;
      case kMkNorm:
        if (c.norm_out) std::memcpy(c.norm_out[ins.b] + c.norm_at, a, m * sizeof(float));
        else c.norms[ins.b].add(a, m);
        break;
      case kMkSum: c.sums[ins.b].add(a, m); break;
      case kMkVarPop:
        for (size_t s0 = 0; s0 < m; s0 += kB)
          var_pop(d + s0, a + s0, c.stride, ins.b, std::min(kB, m - s0));
        break;
      case kMkDellaLt:
        della_lt(d, a, m, c.n[ins.b], c.n[ins.b + 1], (*c.della_probs)[&ins - c.code->data()].data(), e0,
                 c.sort_scratch);
        break;
      case kMkSum64: c.sums64[ins.b].add(a, m); break;
      case kMkHistHigh: {
        // two halves, even and odd elements: neighbours in one bin do not wait on each other's store
        uint32_t* h = c.hists + static_cast<size_t>(ins.b) * kHistWords;
        size_t j = 0;
        for (; j + 2 <= m; j += 2) {
          ++h[mag_bits(a[j]) >> 16];
          ++h[65536 + (mag_bits(a[j + 1]) >> 16)];
        }
        if (j < m) ++h[mag_bits(a[j]) >> 16];
        break;
      }
      case kMkHistLow: {
        uint32_t* h = c.hists + static_cast<size_t>(ins.b) * kHistWords;
        const uint64_t bucket = c.n[ins.c];
        for (size_t j = 0; j < m; ++j) {
          const uint32_t key = mag_bits(a[j]);
          if ((key >> 16) == bucket) ++h[key & 0xFFFF];
        }
        break;
      }
      case kMkEqCount: {
        const uint64_t value = c.n[ins.c];
        int64_t k = 0;
        for (size_t j = 0; j < m; ++j) k += mag_bits(a[j]) == value;
        c.counts[ins.b] += k;
        break;
      }
      case kMkRank: rank_band(c, ins, d, a, m); break;
      case kMkMaskOut: mask_out(c.masks[ins.b], a, m, e0); break;
      case kMkMaskIn: mask_in(c.masks[ins.a], d, m, e0); break;
      default: break;
    }
  }
}

// A task's histogram (its two halves added) as its non-zero bins (bin << 32 | count), cleared.
constexpr uint64_t kTaskBins = 4096;  // the most bins a task's kept histogram holds

void flush_task_hist(uint32_t* task, std::vector<uint64_t>* bins) {
  bins->clear();
  for (uint32_t b = 0; b < 65536; ++b) {
    const uint32_t n = task[b] + task[65536 + b];
    if (!n) continue;
    bins->push_back((static_cast<uint64_t>(b) << 32) | n);
    task[b] = task[65536 + b] = 0;
  }
}

// Histogram counters kept from one call to the next: the pages of a fresh megabyte fault in one
// by one, which took longer than a small tensor's whole pass. A worker gives its counters back
// all zero (flush_task_hist clears what it reads) when it finishes, and not at all when it fails.
class HistPool {
 public:
  std::vector<uint32_t> take(size_t n) {
    std::lock_guard<std::mutex> g(m_);
    for (size_t i = 0; i < free_.size(); ++i)
      if (free_[i].size() == n) {
        std::vector<uint32_t> v = std::move(free_[i]);
        free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
        return v;
      }
    return std::vector<uint32_t>(n, 0);
  }
  void give(std::vector<uint32_t>&& v) {
    std::lock_guard<std::mutex> g(m_);
    uint64_t held = 0;
    for (const auto& f : free_) held += f.size();
    if (!v.empty() && (held + v.size()) * sizeof(uint32_t) <= kMaxHeld) free_.push_back(std::move(v));
  }

 private:
  static constexpr uint64_t kMaxHeld = 8 << 20;
  std::mutex m_;
  std::vector<std::vector<uint32_t>> free_;
};

HistPool g_hist_pool;

// whole_sums needs a program whose sums are all Sum or Norm: with a Sum, over segments of whole
// groups of the sum of numel elements (TorchSum::group); with Norms, segments whose operands fit
// kWholeNormElems.
void check_whole_sums(const Shape& shape, uint64_t numel, uint64_t seg) {
  for (char kind : shape.slot_kind)
    if (kind != 1 && kind != 2) fail("mk_program: whole_sums needs a program whose sum slots are all Sum or Norm");
  const uint64_t norms = shape.norm_slots;
  if (norms && std::min(seg, numel) > kWholeNormElems / norms)
    fail("mk_program: whole_sums keeps a segment of each Norm's operands: at most " +
         std::to_string(kWholeNormElems) + " elements over its " + std::to_string(norms) + " Norm slots, not " +
         std::to_string(seg) + " each");
  TorchSum probe;
  probe.init(numel, nullptr);
  if (norms < shape.sums && seg % probe.group() && seg < numel)
    fail("mk_program: whole_sums needs segments of whole groups of " + std::to_string(probe.group()) +
         " elements, not " + std::to_string(seg));
}

// Tasks that add to one state in task order, whichever worker finishes first: each waits for its
// turn. A worker that fails gives up the turns, so that none waits for a task never finished.
class TaskTurns {
 public:
  // Whether task t's turn came (false: a worker failed).
  bool wait(uint64_t t) {
    std::unique_lock<std::mutex> g(m_);
    cv_.wait(g, [&] { return failed_ || next_ == t; });
    return !failed_;
  }
  void done() {
    { std::lock_guard<std::mutex> g(m_); ++next_; }
    cv_.notify_all();
  }
  void fail() {
    { std::lock_guard<std::mutex> g(m_); failed_ = true; }
    cv_.notify_all();
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  uint64_t next_ = 0;
  bool failed_ = false;
};

// Row 0 of res.sums = each Sum slot over the whole tensor, in torch's order: the last task's state
// with its last level made of every task's additions to it, in task order; later rows 0. A Norm
// slot's is whole_norms' total.
void join_whole_sums(MkResult* res, const Shape& shape, const std::vector<std::vector<float>>& last_levels,
                     std::vector<TorchSum>& tail, std::vector<std::vector<float>>& tail_rows,
                     const std::vector<TorchNorm>& whole_norms) {
  for (size_t s = 0; s < shape.sums; ++s) {
    if (shape.slot_kind[s] == 2) {
      res->sums[s] = whole_norms[s].total();
      continue;
    }
    TorchSum& sum = tail[s];
    sum.buf = tail_rows[s].data();
    float top[kRow] = {};
    for (uint64_t t = 0; t < res->tasks; ++t) {
      const std::vector<float>& v = last_levels[t * shape.sums + s];
      for (size_t i = 0; i < v.size(); i += kRow)
        for (size_t l = 0; l < kRow; ++l) top[l] = top[l] + v[i + l];
    }
    std::memcpy(sum.acc[3], top, sizeof top);
    res->sums[s] = sum.total();
  }
}

// Elements per block: kB, or whole rows when the program ranks within rows (DellaLt), which
// then needs chunks, segments and the tensor to be whole rows.
uint64_t block_elems(const std::vector<MkInstr>& code, const std::vector<uint64_t>& ints, uint64_t numel,
                     uint64_t chunk, uint64_t segment) {
  uint64_t cols = 0;
  for (const MkInstr& ins : code) {
    if (ins.op != kMkDellaLt) continue;
    const uint64_t n = ints[static_cast<size_t>(ins.b) + 1];
    if (n == 0 || n > UINT32_MAX || (cols && n != cols))
      fail("mk_program: DellaLt's row length must be one number in [1, 2^32)");
    cols = n;
  }
  if (!cols) return kB;
  if (numel % cols || (chunk % cols && chunk < numel) || (segment % cols && segment < numel))
    fail("mk_program: DellaLt needs the tensor, chunk_elems and segment_elems in whole rows of " +
         std::to_string(cols));
  const uint64_t blk = cols * std::max<uint64_t>(1, kB / cols);
  return chunk % blk == 0 ? blk : cols;
}

// A program's steps in phases [i0, i1) run block by block: each DellaLt alone, over the block's
// whole rows, and the steps between in pieces of kB elements, each piece through all of them in
// turn, so that the registers they pass on stay in the L1 cache while rows are long.
std::vector<std::pair<size_t, size_t>> program_phases(const std::vector<MkInstr>& code) {
  std::vector<std::pair<size_t, size_t>> phases;
  size_t i0 = 0;
  for (size_t i = 0; i < code.size(); ++i) {
    if (code[i].op != kMkDellaLt) continue;
    if (i > i0) phases.emplace_back(i0, i);
    phases.emplace_back(i, i + 1);
    i0 = i + 1;
  }
  if (code.size() > i0) phases.emplace_back(i0, code.size());
  return phases;
}

}  // namespace

void set_mask_simd_enabled(bool enabled) { g_mask_simd.store(enabled); }

MkResult mk_program_run(const std::vector<FileSlice>& in, const std::vector<DType>& in_dt,
                        uint64_t numel, const std::vector<MkInstr>& code,
                        const std::vector<double>& consts, const std::vector<uint64_t>& ints,
                        const std::vector<MkRank>& ranks, ShardWriter* out, uint64_t out_offset,
                        DType out_dt, uint64_t chunk, uint64_t segment, uint64_t index_base,
                        int64_t threads, bool keep_tasks, const std::vector<MkMask>& masks,
                        bool whole_sums, bool keep_mapped) {
  if (in.size() != in_dt.size()) fail("mk_program: inputs and input_dtypes differ in length");
  if (chunk == 0) fail("mk_program: chunk_elems must be >= 1");
  const Shape shape = check_code(code, in.size(), consts.size(), ints.size(), ranks.size(), masks.size());
  for (size_t i = 0; i < masks.size(); ++i) {
    uint64_t end = 0;
    if (!add_ok(index_base, numel, &end) || masks[i].bytes < end / 8 + (end % 8 != 0))
      fail("mk_program: masks[" + std::to_string(i) + "] holds " + std::to_string(masks[i].bytes) +
           " bytes, too few for elements up to " + std::to_string(index_base) + " + " + std::to_string(numel));
  }
  if (shape.stores && !out) fail("mk_program: the program stores but there is no output");
  if (keep_mapped && out) fail("mk_program: keep_mapped is for passes that a writing pass follows, not for one that writes");
  if (!shape.stores && out) fail("mk_program: there is an output but the program never stores");
  check_slices(in, in_dt, numel, "mk_program: inputs");
  if (out) check_out_slice(*out, out_offset, numel, out_dt, "mk_program");
  if (segment == 0) fail("mk_program: segment_elems must be >= 1");
  const uint64_t seg = std::min(segment, std::max<uint64_t>(numel, 1));
  const uint64_t c = std::min(chunk, seg);
  const uint64_t blk = block_elems(code, ints, numel, c, seg);
  MkResult res;
  res.tasks = numel == 0 ? 0 : (numel + seg - 1) / seg;
  std::vector<size_t> running_at(ranks.size() + 1, 0);
  for (size_t i = 0; i < ranks.size(); ++i) {
    const MkRank& r = ranks[i];
    if (r.values.size() != r.greater.size() || r.values.size() > 8)
      fail("mk_program: ranks[" + std::to_string(i) + "] has mismatched or too many values");
    if (!r.seen.empty() && r.seen.size() != res.tasks * r.values.size())
      fail("mk_program: ranks[" + std::to_string(i) + "].seen has " + std::to_string(r.seen.size()) +
           " entries, not tasks x values = " + std::to_string(res.tasks * r.values.size()));
    running_at[i + 1] = running_at[i] + r.values.size();
  }
  res.sums.assign(res.tasks * shape.sums, 0.0);
  res.hists.assign(shape.hists * 65536, 0);
  if (keep_tasks) {
    if (seg > UINT32_MAX) fail("mk_program: task histograms need segments below 2^32 elements");
    res.task_hists.assign(shape.hists * res.tasks, {});
    res.task_overflow.assign(shape.hists, 0);
  }
  res.eqcounts.assign(res.tasks * shape.counts, 0);
  const StreamFiles files("mk_program", nullptr, DType::F32, in, in_dt, out, out_offset, out_dt);
  if (whole_sums) check_whole_sums(shape, numel, seg);
  if (numel == 0) return res;
  // whole_sums: per task and Sum slot, what it adds to torch's last level; the last task's state
  std::vector<std::vector<float>> last_levels(whole_sums ? res.tasks * shape.sums : 0);
  std::vector<TorchSum> tail(whole_sums ? shape.sums : 0);
  std::vector<std::vector<float>> tail_rows(tail.size());
  // whole_sums: each Norm slot over the whole tensor, its segments added in task order
  std::vector<TorchNorm> whole_norms(whole_sums ? shape.sums : 0);
  for (size_t s = 0; s < whole_norms.size(); ++s)
    if (shape.slot_kind[s] == 2) whole_norms[s].init(numel);
  const size_t whole_norm_slots = whole_sums ? shape.norm_slots : 0;
  TaskTurns turns;

  uint64_t step_max = 16;  // the largest TorchSum block over any task (whole_sums: of the tensor's)
  {
    const uint64_t rows = (whole_sums ? numel : seg) / kRow;
    const uint64_t bits = rows > 1 ? 64 - static_cast<uint64_t>(__builtin_clzll(rows - 1)) : 0;
    step_max = uint64_t{1} << std::max<uint64_t>(4, bits / 4);
  }
  const std::vector<std::pair<size_t, size_t>> phases = program_phases(code);
  std::vector<std::vector<double>> probs(code.size());
  for (size_t i = 0; i < code.size(); ++i)
    if (code[i].op == kMkDellaLt) probs[i] = della_probs(ints[code[i].b + 1], consts[code[i].c], consts[code[i].c + 1]);
  const size_t nthreads = resolve_threads(threads, res.tasks);
  uint64_t in_bytes = 0;  // each fits its file (check_slices); their sum may not fit 64 bits
  bool keep = keep_mapped;
  for (DType dt : in_dt) keep = keep && add_ok(in_bytes, numel * dtype_size(dt), &in_bytes);
  keep = keep && in_bytes <= kKeepMappedBytes;
  std::mutex merge_m;
  auto work = [&](TaskQueue& q) {
    ChunkReader r(files, c, out != nullptr, nullptr, keep);
    Array<float> regs = alloc_array<float>(static_cast<uint64_t>(std::max(shape.regs, 1)) * blk, "mk_program registers");
    const bool by_rows = std::any_of(code.begin(), code.end(), [](const MkInstr& i) { return i.op == kMkDellaLt; });
    Array<uint32_t> sort_scratch = alloc_array<uint32_t>(by_rows ? 6 * blk : 1, "mk_program row ranks");
    std::vector<TorchSum> sums(shape.sums);
    std::vector<TorchNorm> norms(shape.sums);
    std::vector<LaneSum> sums64(shape.sums);
    Array<float> sumbuf = alloc_array<float>(std::max<uint64_t>(shape.sums, 1) * step_max * kRow, "mk_program sums");
    std::vector<uint32_t> task_hists = g_hist_pool.take(shape.hists * kHistWords);
    std::vector<uint64_t> bins;
    std::vector<uint64_t> running(running_at.back() + 1, 0);
    Array<float> norm_buf = alloc_array<float>(std::max<uint64_t>(whole_norm_slots * seg, 1), "mk_program norms");
    std::vector<float*> norm_out(shape.sums, nullptr);
    for (size_t s = 0, i = 0; s < shape.sums && whole_norm_slots; ++s)
      if (shape.slot_kind[s] == 2) norm_out[s] = norm_buf.get() + (i++) * seg;
    Ctx cx{&code, consts.data(), ints.data(), ranks.data(), in.size(), in_dt.data(), out_dt,
           regs.get(), blk, sort_scratch.get(), sums.data(), norms.data(), sums64.data(), task_hists.data(),
           nullptr, running.data(), running_at.data(), masks.data(), &probs,
           whole_norm_slots ? norm_out.data() : nullptr, 0};
    std::vector<const unsigned char*> ptrs(in.size());
    std::vector<size_t> in_size(in.size());
    for (size_t i = 0; i < in.size(); ++i) in_size[i] = dtype_size(in_dt[i]);
    uint64_t t;
    while (q.pop(&t)) {
      const uint64_t t0 = t * seg;
      const uint64_t tm = std::min(seg, numel - t0);
      for (size_t s = 0; s < shape.sums; ++s) {
        if (shape.slot_kind[s] == 2) {
          if (!norm_out[s]) norms[s].init(tm);  // else kept whole, in whole_norms
        } else if (shape.slot_kind[s] == 1 && whole_sums)
          sums[s].init(numel, sumbuf.get() + s * step_max * kRow, t0, &last_levels[t * shape.sums + s]);
        else if (shape.slot_kind[s] == 1) sums[s].init(tm, sumbuf.get() + s * step_max * kRow);
        sums64[s] = LaneSum{};
      }
      for (size_t i = 0; i < ranks.size(); ++i)
        for (size_t v = 0; v < ranks[i].values.size(); ++v)
          running[running_at[i] + v] = ranks[i].seen.empty() ? 0 : ranks[i].seen[t * ranks[i].values.size() + v];
      cx.counts = res.eqcounts.data() + t * shape.counts;
      const size_t osz = dtype_size(out_dt);
      for (uint64_t e0 = t0; e0 < t0 + tm; e0 += c) {
        const uint64_t m = std::min(c, t0 + tm - e0);
        r.load(e0, m);
        const unsigned char* const* src = r.in();
        unsigned char* o = r.out();
        recoverable([&] {
          for (uint64_t b0 = 0; b0 < m; b0 += blk) {
            const size_t bm = static_cast<size_t>(std::min<uint64_t>(blk, m - b0));
            for (const auto& [i0, i1] : phases) {
              const size_t piece = code[i0].op == kMkDellaLt ? bm : kB;
              for (size_t off = 0; off < bm; off += piece) {
                const size_t n = std::min(piece, bm - off);
                const uint64_t at = b0 + off;
                for (size_t i = 0; i < ptrs.size(); ++i) ptrs[i] = src[i] + at * in_size[i];
                cx.norm_at = e0 - t0 + at;
                run_block(cx, ptrs.data(), o ? o + at * osz : nullptr, n, index_base + e0 + at, code.data() + i0,
                          code.data() + i1, off);
              }
            }
          }
        });
        if (out) r.store(e0, m);
      }
      if (whole_norm_slots) {
        if (!turns.wait(t)) return;
        for (size_t s = 0; s < shape.sums; ++s)
          if (norm_out[s]) whole_norms[s].add(norm_out[s], tm);
        turns.done();
      }
      for (size_t s = 0; s < shape.sums; ++s) {
        if (whole_sums) {
          if (shape.slot_kind[s] == 1 && t + 1 == res.tasks) {
            tail[s] = sums[s];
            tail_rows[s].assign(sums[s].buf, sums[s].buf + sums[s].buffered);
          }
          continue;
        }
        res.sums[t * shape.sums + s] = shape.slot_kind[s] == 2   ? norms[s].total()
                                       : shape.slot_kind[s] == 1 ? sums[s].total()
                                                                 : sums64[s].total();
      }
      for (size_t h = 0; h < shape.hists; ++h) {
        flush_task_hist(task_hists.data() + h * kHistWords, &bins);
        const bool fits = bins.size() <= kTaskBins;
        if (keep_tasks && fits) res.task_hists[h * res.tasks + t] = bins;
        std::lock_guard<std::mutex> g(merge_m);
        int64_t* total = res.hists.data() + h * 65536;
        for (uint64_t e : bins) total[e >> 32] += static_cast<int64_t>(e & 0xFFFFFFFFu);
        if (keep_tasks && !fits) res.task_overflow[h] = 1;
      }
    }
    g_hist_pool.give(std::move(task_hists));
  };
  run_pool(nthreads, res.tasks, [&](TaskQueue& q) {
    try {
      work(q);
    } catch (...) {
      turns.fail();
      throw;
    }
  });
  files.check_mapped_inputs(numel);
  if (whole_sums) join_whole_sums(&res, shape, last_levels, tail, tail_rows, whole_norms);
  for (size_t h = 0; h < res.task_overflow.size(); ++h)  // a slot is kept whole or not at all
    if (res.task_overflow[h])
      for (uint64_t t = 0; t < res.tasks; ++t) res.task_hists[h * res.tasks + t] = {};
  return res;
}

}  // namespace lsf
