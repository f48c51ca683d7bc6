// Passes 1 and 2 of TIES: the trim thresholds, found exactly by a two-level radix select over the
// bit patterns of |d| (see ties.hpp). Histograms are integer counts, so the thresholds do not
// depend on threads or chunking.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "mapped.hpp"
#include "numerics.hpp"
#include "ties_internal.hpp"

namespace lsf {
namespace ties_detail {

namespace {

constexpr size_t kHiBins = size_t{1} << 15;  // top 16 bits of |d| (its sign bit is always 0)
constexpr size_t kLoBins = size_t{1} << 16;  // low 16 bits
constexpr uint32_t kNanThr = 0x7F800001u;    // smallest |NaN| pattern: every NaN is kept
constexpr uint32_t kKeepNone = 0x80000000u;  // above every |d| pattern: nothing is kept

// One pass-1 bin: how many |d| have these top 16 bits, and how many of them have all low 16 bits
// zero. Those are the smallest values of the bin, so when the wanted rank within the bin falls
// among them, tau is the bin's base pattern without a pass 2 (common in 16-bit checkpoints,
// whose deltas often have few significant bits).
struct HiBin {
  uint64_t cnt;
  uint64_t lo_zero;
};
static_assert(sizeof(HiBin) == 16, "HiBin is 16 bytes");

// Pass 1 counts per thread by a 16-bit key, computed vectorised: the top 16 bits of |d| (15
// significant, its sign bit being 0) with bit 15 set when the low 16 bits are zero. Bin b of
// HiBin is then cnt = c[b] + c[b | 0x8000], lo_zero = c[b | 0x8000], and an element costs one
// uint32 increment. kSub interleaved sub-histograms per expert (element j of a block goes to
// sub-histogram j % kSub; the experts' increments are interleaved too) keep runs of equal keys,
// common as |d| clusters in few bins, from chaining every increment on the previous one through
// store-to-load forwarding. The uint32 counts move to uint64 totals before they could overflow:
// after at most kFlushAt elements per thread and expert.
constexpr size_t kSub = 2;
constexpr size_t kKeys = size_t{1} << 16;
constexpr uint32_t kLoZeroKey = 0x8000u;
constexpr uint64_t kFlushAt = 0xFFFFFFFFu;

// u = bit pattern of |float32(x) - b|
template <DType D>
LSF_INLINE void pass_abs_bits(uint32_t* __restrict u, const unsigned char* __restrict p,
                              const float* __restrict b, size_t m) {
  for (size_t j = 0; j < m; ++j) u[j] = f32_to_bits(Elem<D>::load(p, j) - b[j]) & kAbsMask;
}

// k = the pass-1 key of |float32(x) - b| (see kLoZeroKey); [lo, hi] widened to cover the bins
// other than bin 0 (that of the zero deltas, common, which would make every range start at 0).
template <DType D>
LSF_INLINE void pass_hi_keys(uint16_t* __restrict k, const unsigned char* __restrict p,
                             const float* __restrict b, size_t m, uint32_t* lo, uint32_t* hi) {
  uint32_t mn = *lo - 1, mx = *hi;  // mn: the smallest bin - 1, bin 0 wrapping to the top
  for (size_t j = 0; j < m; ++j) {
    const uint32_t x = f32_to_bits(Elem<D>::load(p, j) - b[j]) & kAbsMask;
    const uint32_t bin = x >> 16;
    k[j] = static_cast<uint16_t>(bin | ((x & 0xFFFFu) == 0 ? kLoZeroKey : 0u));
    mn = std::min(mn, bin - 1);
    mx = std::max(mx, bin);
  }
  *lo = mn + 1;
  *hi = mx;
}

// Count the keys of one block (k: N x kBlk) into h (N x kSub histograms of kKeys), experts and
// sub-histograms interleaved so that the increments in flight are independent.
template <size_t N>
LSF_INLINE void add_hi_fused(uint32_t* __restrict h, const uint16_t* __restrict k, size_t m) {
  size_t j = 0;
  for (; j + kSub <= m; j += kSub)
    for (size_t e = 0; e < N; ++e)
      for (size_t s = 0; s < kSub; ++s) h[(e * kSub + s) * kKeys + k[e * kBlk + j + s]] += 1;
  for (; j < m; ++j)
    for (size_t e = 0; e < N; ++e) h[e * kSub * kKeys + k[e * kBlk + j]] += 1;
}

LSF_INLINE void add_lo(uint64_t* __restrict h, const uint32_t* __restrict u, uint32_t hi,
                       size_t m) {
  for (size_t j = 0; j < m; ++j)
    if ((u[j] >> 16) == hi) h[u[j] & 0xFFFFu] += 1;
}

// One thread's pass-1 counts: n_ex x kSub histograms of kKeys uint32 in memory the caller owns,
// the range of bins each expert has touched besides bin 0 (only those entries and bin 0 are ever
// nonzero, so only those are folded), and, only past kFlushAt elements per expert,
// uint64 totals the counts are spilled into.
class HiLocal {
 public:
  HiLocal(size_t n_ex, uint32_t* h)
      : n_ex_(n_ex),
        h_(h),
        lo_(n_ex, kEmptyLo),
        hi_(n_ex, 0),
        slo_(n_ex, kEmptyLo),
        shi_(n_ex, 0) {}
  // Zero the counts; by the thread that then uses them.
  void clear() { std::fill(h_, h_ + n_ex_ * kSub * kKeys, uint32_t{0}); }
  uint32_t* counts() { return h_; }
  uint32_t* lo(size_t e) { return &lo_[e]; }
  uint32_t* hi(size_t e) { return &hi_[e]; }
  // Make room for m more elements per expert: spill first if a count could overflow.
  void reserve(uint64_t m) {
    if (pending_ + m > kFlushAt) spill();
    pending_ += m;
  }
  // The range of bins besides 0 expert e has touched, spilled or not: empty when lo > hi.
  uint32_t range_lo(size_t e) const { return std::min(lo_[e], slo_[e]); }
  uint32_t range_hi(size_t e) const { return std::max(hi_[e], shi_[e]); }
  // Add all of expert e's counts into t0 (bin 0) and t (bins [t_lo, t_lo + len), covering its
  // range).
  void fold_into(size_t e, HiBin* t0, HiBin* t, uint32_t t_lo) const {
    const uint32_t* h = h_ + e * kSub * kKeys;
    add_bin(h, 0, t0);
    for (uint32_t b = lo_[e]; b <= hi_[e]; ++b) add_bin(h, b, &t[b - t_lo]);
    if (spilled_) {
      const HiBin* sp = spilled_.get() + e * kHiBins;
      t0->cnt += sp[0].cnt;
      t0->lo_zero += sp[0].lo_zero;
      for (uint32_t b = slo_[e]; b <= shi_[e]; ++b) {
        t[b - t_lo].cnt += sp[b].cnt;
        t[b - t_lo].lo_zero += sp[b].lo_zero;
      }
    }
  }

 private:
  static constexpr uint32_t kEmptyLo = kHiBins;

  static void add_bin(const uint32_t* h, uint32_t b, HiBin* t) {
    uint64_t any = 0, zero = 0;
    for (size_t s = 0; s < kSub; ++s) {
      any += h[s * kKeys + b];
      zero += h[s * kKeys + (b | kLoZeroKey)];
    }
    t->cnt += any + zero;
    t->lo_zero += zero;
  }

  static void clear_bins(uint32_t* h, uint32_t lo, uint32_t hi) {
    for (size_t s = 0; s < kSub; ++s) {
      std::fill(h + s * kKeys + lo, h + s * kKeys + hi + 1, uint32_t{0});
      std::fill(h + s * kKeys + (lo | kLoZeroKey), h + s * kKeys + (hi | kLoZeroKey) + 1,
                uint32_t{0});
    }
  }

  // Move the uint32 counts into the uint64 spill totals (never reached below 2^32 elements per
  // thread and expert).
  void spill() {
    if (!spilled_) {
      spilled_ = alloc_array<HiBin>(static_cast<uint64_t>(n_ex_) * kHiBins, "ties histograms");
      std::fill(spilled_.get(), spilled_.get() + n_ex_ * kHiBins, HiBin{0, 0});
    }
    for (size_t e = 0; e < n_ex_; ++e) {
      HiBin* sp = spilled_.get() + e * kHiBins;
      uint32_t* h = h_ + e * kSub * kKeys;
      add_bin(h, 0, &sp[0]);
      clear_bins(h, 0, 0);
      for (uint32_t b = lo_[e]; b <= hi_[e]; ++b) add_bin(h, b, &sp[b]);
      if (lo_[e] <= hi_[e]) clear_bins(h, lo_[e], hi_[e]);
      slo_[e] = std::min(slo_[e], lo_[e]);
      shi_[e] = std::max(shi_[e], hi_[e]);
      lo_[e] = kEmptyLo;
      hi_[e] = 0;
    }
    pending_ = 0;
  }

  size_t n_ex_;
  uint32_t* h_;
  // Bins touched since the last spill, and bins holding spilled counts, besides bin 0: empty
  // (lo > hi) or within [1, kHiBins - 1].
  std::vector<uint32_t> lo_, hi_;
  std::vector<uint32_t> slo_, shi_;
  Array<HiBin> spilled_;
  uint64_t pending_ = 0;
};

// Pass 1 over n consecutive elements: count the pass-1 key of every |d_e| (sc: n_ex key blocks).
LSF_CLONES
void hist_hi_range(const unsigned char* base, DType bdt, size_t n_ex,
                   const unsigned char* const* ex, const DType* edt, size_t n, HiLocal& hist,
                   Scratch& sc) {
  float* bf = sc.base();
  uint32_t* h = hist.counts();
  const size_t bsz = dtype_size(bdt);
  for (size_t s = 0; s < n; s += kBlk) {
    const size_t m = std::min(kBlk, n - s);
    hist.reserve(m);
    LSF_DTYPE_DISPATCH(bdt, DB, pass_to_f32<DB>(bf, base + s * bsz, m));
    for (size_t e = 0; e < n_ex; ++e) {
      const unsigned char* p = ex[e] + s * dtype_size(edt[e]);
      LSF_DTYPE_DISPATCH(edt[e], DI,
                        pass_hi_keys<DI>(sc.keys(e), p, bf, m, hist.lo(e), hist.hi(e)));
    }
    switch (n_ex) {
      case 1: add_hi_fused<1>(h, sc.keys(0), m); break;
      case 2: add_hi_fused<2>(h, sc.keys(0), m); break;
      case 3: add_hi_fused<3>(h, sc.keys(0), m); break;
      case 4: add_hi_fused<4>(h, sc.keys(0), m); break;
      default:
        for (size_t e = 0; e < n_ex; ++e) add_hi_fused<1>(h + e * kSub * kKeys, sc.keys(e), m);
        break;
    }
  }
}

// Pass 2: hist (n_ex x kLoBins) += the low 16 bits of |d_e| where its top 16 bits are hi[e].
LSF_CLONES
void hist_lo_range(const unsigned char* base, DType bdt, size_t n_ex,
                   const unsigned char* const* ex, const DType* edt, const uint32_t* hi, size_t n,
                   uint64_t* hist, Scratch& sc) {
  float* bf = sc.base();
  uint32_t* u = sc.bits();
  const size_t bsz = dtype_size(bdt);
  for (size_t s = 0; s < n; s += kBlk) {
    const size_t m = std::min(kBlk, n - s);
    LSF_DTYPE_DISPATCH(bdt, DB, pass_to_f32<DB>(bf, base + s * bsz, m));
    for (size_t e = 0; e < n_ex; ++e) {
      const unsigned char* p = ex[e] + s * dtype_size(edt[e]);
      LSF_DTYPE_DISPATCH(edt[e], DI, pass_abs_bits<DI>(u, p, bf, m));
      add_lo(hist + e * kLoBins, u, hi[e], m);
    }
  }
}

// The largest bin index b with (sum of counts above b) + count[b] >= k, and k minus the counts
// above it (1 <= k <= total).
template <class Count>
void select_bin(size_t nbins, Count count, uint64_t k, uint32_t* bin, uint64_t* k_in) {
  uint64_t above = 0;
  for (size_t b = nbins; b-- > 0;) {
    const uint64_t c = count(b);
    if (c >= k - above) {
      *bin = static_cast<uint32_t>(b);
      *k_in = k - above;
      return;
    }
    above += c;
  }
  fail("ties: internal error: histogram holds fewer elements than keep");  // not reached
}

}  // namespace

// u = the |d| patterns of n consecutive elements of one expert.
LSF_CLONES
void abs_bits_range(const unsigned char* base, DType bdt, const unsigned char* ex, DType edt,
                    size_t n, uint32_t* u, Scratch& sc) {
  float* bf = sc.base();
  const size_t bsz = dtype_size(bdt);
  const size_t esz = dtype_size(edt);
  for (size_t s = 0; s < n; s += kBlk) {
    const size_t m = std::min(kBlk, n - s);
    LSF_DTYPE_DISPATCH(bdt, DB, pass_to_f32<DB>(bf, base + s * bsz, m));
    LSF_DTYPE_DISPATCH(edt, DI, pass_abs_bits<DI>(u + s, ex + s * esz, bf, m));
  }
}

Thresholds make_thresholds(const std::vector<uint32_t>& tau_bits) {
  Thresholds r;
  for (uint32_t b : tau_bits) {
    r.tau.push_back(f32_from_bits(b));
    r.thr.push_back(std::min(b, kNanThr));
  }
  return r;
}

namespace {

// Where the selection stands after pass 1, per expert: the bin (top 16 bits) tau lies in, the
// rank of tau within that bin, tau itself where pass 1 settled it, and the experts pass 2 must
// settle.
struct Selection {
  std::vector<uint32_t> tau_bits, hi;
  std::vector<uint64_t> k_in;
  std::vector<size_t> pending;
};

uint64_t pass_tasks(const Job& job) { return (job.numel + job.task - 1) / job.task; }

// Pass 1 on nthreads threads, thread slot i counting into hl[i]; how many slots ran (and so
// cleared their counts). The per-thread resources of every pass are allocated on the calling
// thread (from BufPool).
size_t count_hi(const Job& job, size_t nthreads, const std::vector<std::unique_ptr<HiLocal>>& hl) {
  const size_t n = job.edt.size();
  const uint64_t numel = job.numel;
  const uint64_t task = job.task;
  const std::vector<char> use(n, 1);
  std::vector<std::unique_ptr<Chunks>> chs;
  std::vector<std::unique_ptr<Scratch>> scs;
  for (size_t i = 0; i < nthreads; ++i) {
    chs.push_back(job.make(use, false));
    scs.emplace_back(new Scratch(0, n));
  }
  std::atomic<size_t> slots{0};
  run_pool(nthreads, pass_tasks(job), [&](TaskQueue& q) {
    const size_t slot = slots.fetch_add(1);
    HiLocal& h = *hl[slot];
    Chunks& ch = *chs[slot];
    h.clear();
    uint64_t t;
    while (q.pop(&t)) {
      const uint64_t e0 = t * task;
      const uint64_t m = std::min(task, numel - e0);
      ch.load(e0, m);
      const unsigned char* const* ex = ch.ex.data();
      Scratch& sc = *scs[slot];
      recoverable([&] {
        hist_hi_range(ch.base, job.bdt, n, ex, job.edt.data(), static_cast<size_t>(m), h, sc);
      });
    }
  });
  return std::min(slots.load(), nthreads);
}

// Expert e's bin from the counts of the first `used` slots of hl, folded over the bins they
// touched.
void settle_hi(const std::vector<std::unique_ptr<HiLocal>>& hl, size_t used, size_t e,
               uint64_t keep, Selection* sel) {
  uint32_t lo = kHiBins, top = 0;
  for (size_t i = 0; i < used; ++i) {
    lo = std::min(lo, hl[i]->range_lo(e));
    top = std::max(top, hl[i]->range_hi(e));
  }
  if (lo > top) lo = top = 1;  // every |d| in bin 0
  std::vector<HiBin> total(top - lo + 2, HiBin{0, 0});  // bin 0, then bins [lo, top]
  for (size_t i = 0; i < used; ++i) hl[i]->fold_into(e, &total[0], &total[1], lo);
  uint32_t sel_i = 0;
  select_bin(total.size(), [&](size_t b) { return total[b].cnt; }, keep, &sel_i, &sel->k_in[e]);
  const HiBin bin = total[sel_i];
  sel->hi[e] = sel_i == 0 ? 0 : sel_i - 1 + lo;
  if (sel->k_in[e] > bin.cnt - bin.lo_zero) {
    sel->tau_bits[e] = sel->hi[e] << 16;  // the k_in-th largest of the bin has low bits 0
  } else {
    sel->pending.push_back(e);
  }
}

// Pass 1: the pass-1 keys counted per thread, then each expert's bin.
Selection select_hi(const Job& job, uint64_t keep, size_t nthreads) {
  const size_t n = job.edt.size();
  Selection sel{std::vector<uint32_t>(n, 0), std::vector<uint32_t>(n, 0),
                std::vector<uint64_t>(n, 0), {}};
  const uint64_t per_slot = static_cast<uint64_t>(n) * kSub * kKeys;
  auto counts = alloc_array<uint32_t>(nthreads * per_slot, "ties histograms");
  std::vector<std::unique_ptr<HiLocal>> hl;
  for (size_t i = 0; i < nthreads; ++i) hl.emplace_back(new HiLocal(n, counts.get() + i * per_slot));
  const size_t used = count_hi(job, nthreads, hl);
  for (size_t e = 0; e < n; ++e) settle_hi(hl, used, e, keep, &sel);
  return sel;
}

// Pass 2: low 16 bits of the elements in the selected bin, for the experts still open.
void select_lo(const Job& job, size_t nthreads, Selection* sel) {
  const size_t n = job.edt.size();
  const uint64_t numel = job.numel;
  const uint64_t task = job.task;
  const std::vector<size_t>& pending = sel->pending;
  const size_t np = pending.size();
  const uint64_t per_slot = static_cast<uint64_t>(np) * kLoBins;
  auto hist = alloc_array<uint64_t>(nthreads * per_slot, "ties histograms");
  std::fill(hist.get(), hist.get() + nthreads * per_slot, uint64_t{0});
  std::vector<char> use(n, 0);
  std::vector<DType> pdt;
  std::vector<uint32_t> phi;
  for (size_t e : pending) {
    use[e] = 1;
    pdt.push_back(job.edt[e]);
    phi.push_back(sel->hi[e]);
  }
  std::vector<std::unique_ptr<Chunks>> chs;
  std::vector<std::unique_ptr<Scratch>> scs;
  for (size_t i = 0; i < nthreads; ++i) {
    chs.push_back(job.make(use, false));
    scs.emplace_back(new Scratch(0));
  }
  std::atomic<size_t> slots{0};
  run_pool(nthreads, pass_tasks(job), [&](TaskQueue& q) {
    const size_t slot = slots.fetch_add(1);
    uint64_t* h = hist.get() + slot * per_slot;
    Chunks& ch = *chs[slot];
    std::vector<const unsigned char*> ptrs(np);
    uint64_t t;
    while (q.pop(&t)) {
      const uint64_t e0 = t * task;
      const uint64_t m = std::min(task, numel - e0);
      ch.load(e0, m);
      for (size_t i = 0; i < np; ++i) ptrs[i] = ch.ex[pending[i]];
      Scratch& sc = *scs[slot];
      recoverable([&] {
        hist_lo_range(ch.base, job.bdt, np, ptrs.data(), pdt.data(), phi.data(),
                      static_cast<size_t>(m), h, sc);
      });
    }
  });
  uint64_t* total = hist.get();
  for (size_t slot = 1; slot < nthreads; ++slot) {
    const uint64_t* h = hist.get() + slot * per_slot;
    for (uint64_t b = 0; b < per_slot; ++b) total[b] += h[b];
  }
  for (size_t i = 0; i < np; ++i) {
    const size_t e = pending[i];
    const uint64_t* h = total + i * kLoBins;
    uint32_t lo = 0;
    uint64_t unused = 0;
    select_bin(kLoBins, [&](size_t b) { return h[b]; }, sel->k_in[e], &lo, &unused);
    sel->tau_bits[e] = (sel->hi[e] << 16) | lo;
  }
}

}  // namespace

Thresholds select_thresholds(const Job& job, uint64_t keep) {
  const size_t n = job.edt.size();
  Thresholds r;
  if (keep == 0) {
    r.tau.assign(n, std::numeric_limits<float>::infinity());
    r.thr.assign(n, kKeepNone);
    return r;
  }
  if (keep >= job.numel) {
    r.tau.assign(n, 0.0f);
    r.thr.assign(n, 0);
    return r;
  }
  const size_t nthreads = pass_threads(job);
  Selection sel = select_hi(job, keep, nthreads);
  if (!sel.pending.empty()) select_lo(job, nthreads, &sel);
  return make_thresholds(sel.tau_bits);
}

}  // namespace ties_detail
}  // namespace lsf
