// The one pass of ties_file over a sampled bracket.
//
// The exact passes read every input twice (three times without the pass-2 shortcut). For a large
// tensor, ties_file first reads a small sample and brackets each tau_i by a range of |d| patterns
// [lo_i, hi_i] that holds it with high probability. One pass then writes the output under the
// sample's guess of tau_i, counts the patterns above hi_i and those equal to a few "heavy"
// patterns of the bracket (values that many elements share, as deltas of 16-bit checkpoints do),
// and records position and input bytes of every other element with a pattern inside a bracket.
// That gives each tau_i exactly. Recorded elements whose output differs under the exact tau_i
// are written again; if a heavy pattern's decision changes, a second pass rewrites the output with
// the exact thresholds. When a tau_i falls outside its bracket, or the records would outgrow
// their budget, the exact passes run instead. The bytes are the same whichever way it goes.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "mapped.hpp"
#include "ties.hpp"
#include "ties_internal.hpp"

namespace lsf {
namespace ties_detail {

namespace {

constexpr uint64_t kOnePassMin = 1ULL << 16;   // smaller tensors take the exact passes
constexpr uint64_t kSampleBlk = 512;           // elements per sample block
constexpr uint64_t kSampleMin = 1ULL << 14;    // sample size: numel / 64 within these bounds
constexpr uint64_t kSampleMax = 1ULL << 21;

// How the calls went, for ties_file_stats.
struct {
  std::atomic<uint64_t> one_pass{0}, rewritten{0}, fallback_budget{0}, fallback_miss{0};
  std::atomic<uint64_t> records{0}, patched{0};
} g_stats;

struct Bracket {
  std::vector<uint32_t> lo, hi, guess;         // per expert, patterns of |d|
  std::vector<std::vector<uint32_t>> heavy;    // per expert, kMaxHeavy patterns (see BracketSide)
};

// The values at indices a..b (a <= b < v.size()) of v sorted ascending: one counting pass over
// the top 16 bits finds the buckets those indices fall in, and only those buckets are sorted
// (selecting with nth_element instead mispredicts a branch on most elements).
std::vector<uint32_t> sorted_span(const std::vector<uint32_t>& v, uint64_t a, uint64_t b) {
  std::vector<uint32_t> count(size_t{1} << 16);
  for (uint32_t x : v) ++count[x >> 16];
  uint64_t below = 0;  // elements in buckets before k
  uint32_t k = 0;
  while (below + count[k] <= a) below += count[k++];
  const uint32_t k_lo = k;
  for (uint64_t upto = below; upto + count[k] <= b;) upto += count[k++];
  const uint32_t width = k - k_lo;
  std::vector<uint32_t> w;
  for (uint32_t x : v)
    if ((x >> 16) - k_lo <= width) w.push_back(x);
  std::sort(w.begin(), w.end());
  return std::vector<uint32_t>(w.begin() + static_cast<std::ptrdiff_t>(a - below),
                               w.begin() + static_cast<std::ptrdiff_t>(b - below + 1));
}

// The heavy patterns of a bracket: those with at least max(8, len / 64) of the len sample values
// in it (given sorted), the most frequent first.
std::vector<uint32_t> heavy_patterns(std::vector<uint32_t>::const_iterator first,
                                     std::vector<uint32_t>::const_iterator last) {
  const auto len = static_cast<uint64_t>(last - first);
  const uint64_t at_least = std::max<uint64_t>(8, len / 64);
  std::vector<std::pair<uint64_t, uint32_t>> runs;
  for (auto it = first; it != last;) {
    auto end = std::upper_bound(it, last, *it);
    const auto run = static_cast<uint64_t>(end - it);
    if (run >= at_least) runs.emplace_back(run, *it);
    it = end;
  }
  std::sort(runs.begin(), runs.end(), std::greater<std::pair<uint64_t, uint32_t>>());
  std::vector<uint32_t> heavy(kMaxHeavy, kNoPattern);
  for (size_t i = 0; i < runs.size() && i < kMaxHeavy; ++i) heavy[i] = runs[i].second;
  return heavy;
}

// The sample is nb blocks of kSampleBlk elements, block i starting at floor(i * numel / nb)
// (tests build inputs that mislead this sample, to reach the fallback). The guess is the sample's
// quantile of rank keep / numel (from the top); the bracket reaches 6 standard deviations of that
// rank (as if the sample were independent draws) plus 64 elements to either side.
Bracket sample_bracket(const Job& job, uint64_t keep) {
  const size_t n = job.edt.size();
  const uint64_t numel = job.numel;
  const uint64_t want = std::min(std::max(numel / 64, kSampleMin), kSampleMax);
  const uint64_t nb = (want + kSampleBlk - 1) / kSampleBlk;
  const uint64_t s = nb * kSampleBlk;
  std::vector<std::vector<uint32_t>> keys(n, std::vector<uint32_t>(s));
  std::unique_ptr<Chunks> ch = job.make(std::vector<char>(n, 1), false);
  Scratch sc(0);
  const uint64_t piece = std::min<uint64_t>(kSampleBlk, job.task);
  for (uint64_t i = 0; i < nb; ++i) {
    const auto b0 = static_cast<uint64_t>(static_cast<unsigned __int128>(i) * numel / nb);
    for (uint64_t o = 0; o < kSampleBlk; o += piece) {
      const uint64_t m = std::min(piece, kSampleBlk - o);
      ch->load(b0 + o, m);
      const Chunks& c = *ch;
      recoverable([&] {
        for (size_t e = 0; e < n; ++e)
          abs_bits_range(c.base, job.bdt, c.ex[e], job.edt[e], static_cast<size_t>(m),
                         keys[e].data() + i * kSampleBlk + o, sc);
      });
    }
  }
  const double q = static_cast<double>(keep) / static_cast<double>(numel);
  const uint64_t r = std::min(s - 1, static_cast<uint64_t>(q * static_cast<double>(s)));
  const auto margin =
      static_cast<uint64_t>(6.0 * std::sqrt(static_cast<double>(s) * q * (1.0 - q))) + 64;
  const uint64_t first = r >= margin ? r - margin : 0;  // ranks from the top
  const uint64_t last = std::min(s - 1, r + margin);
  // In ascending order rank i from the top is at index s - 1 - i: only the indices from
  // s - 1 - last to s - 1 - first need their sorted values.
  const uint64_t at_lo = s - 1 - last, at_hi = s - 1 - first;
  Bracket br;
  for (const auto& v : keys) {
    const std::vector<uint32_t> span = sorted_span(v, at_lo, at_hi);
    br.guess.push_back(span[s - 1 - r - at_lo]);
    br.hi.push_back(first > 0 ? span.back() : 0xFFFFFFFFu);
    br.lo.push_back(last < s - 1 ? span.front() : 0u);
    br.heavy.push_back(heavy_patterns(span.begin(), span.end()));
  }
  return br;
}

// One thread's recorded elements: positions, and the bytes of the base and of each expert there;
// and its counts per expert.
struct Records {
  std::vector<uint64_t> pos;
  std::vector<std::vector<unsigned char>> raw;  // [0]: base, [1 + e]: expert e
  std::vector<uint64_t> above;                  // [e]: patterns above hi
  std::vector<uint64_t> heavy;                  // [e * kMaxHeavy + k]: patterns equal to heavy k
};

// Append the flagged elements of a chunk (flags: m bytes, zero-padded to a multiple of 8)
// starting at element e0; idx is scratch.
void collect(const uint8_t* flags, uint64_t m, uint64_t e0, const Chunks& ch, const Job& job,
             std::vector<uint32_t>& idx, Records& rec) {
  idx.clear();
  for (uint64_t j0 = 0; j0 < m; j0 += 8) {
    uint64_t w;
    std::memcpy(&w, flags + j0, 8);
    for (; w != 0; w &= w - 1)  // one set bit (bit 0 of a flag byte) per flagged element
      idx.push_back(static_cast<uint32_t>(j0 + static_cast<uint64_t>(__builtin_ctzll(w)) / 8));
  }
  if (idx.empty()) return;
  const size_t old = rec.pos.size();
  rec.pos.resize(old + idx.size());
  for (size_t i = 0; i < idx.size(); ++i) rec.pos[old + i] = e0 + idx[i];
  for (size_t in = 0; in <= job.edt.size(); ++in) {
    const DType dt = in == 0 ? job.bdt : job.edt[in - 1];
    std::vector<unsigned char>& dst = rec.raw[in];
    const size_t sz = dtype_size(dt);
    dst.resize((old + idx.size()) * sz);
  }
  // The inputs may be mapped: only plain copies from here on (see mapped.hpp).
  const uint32_t* ix = idx.data();
  const size_t ni = idx.size();
  recoverable([&] {
    for (size_t in = 0; in <= job.edt.size(); ++in) {
      const unsigned char* src = in == 0 ? ch.base : ch.ex[in - 1];
      const size_t sz = dtype_size(in == 0 ? job.bdt : job.edt[in - 1]);
      unsigned char* d = rec.raw[in].data() + old * sz;
      if (sz == 2) {
        for (size_t i = 0; i < ni; ++i) std::memcpy(d + 2 * i, src + 2 * ix[i], 2);
      } else {
        for (size_t i = 0; i < ni; ++i) std::memcpy(d + 4 * i, src + 4 * ix[i], 4);
      }
    }
  });
}

// The output under the guessed thresholds, with the counts taken and the elements to check
// recorded; false when the records outgrow max_records (the output is then incomplete).
bool guessed_pass(const Job& job, const Bracket& br, const Thresholds& guess, float lam, DType odt,
                  uint64_t max_records, std::vector<Records>* recs) {
  const size_t n = job.edt.size();
  const size_t nthreads = pass_threads(job);
  ChunkBracket bracket;
  std::vector<std::vector<uint32_t>> idx(nthreads);
  bracket.sides.resize(nthreads);
  recs->assign(nthreads, Records{});
  for (size_t i = 0; i < nthreads; ++i) {
    bracket.flags.push_back(alloc_array<uint8_t>(job.task + 8, "ties flags"));
    Records& r = (*recs)[i];
    r.raw.resize(n + 1);
    r.above.assign(n, 0);
    r.heavy.assign(n * kMaxHeavy, 0);
    for (size_t e = 0; e < n; ++e)
      bracket.sides[i].push_back(BracketSide{br.lo[e], br.hi[e], br.heavy[e].data(), &r.above[e],
                                             &r.heavy[e * kMaxHeavy]});
  }
  std::atomic<uint64_t> total{0};
  std::atomic<bool> over{false};
  merge_pass(
      job, guess, lam, odt,
      [&](size_t slot, uint64_t e0, uint64_t m, const Chunks& ch) {
        Records& rec = (*recs)[slot];
        const uint64_t before = rec.pos.size();
        collect(bracket.flags[slot].get(), m, e0, ch, job, idx[slot], rec);
        const uint64_t added = rec.pos.size() - before;
        if (total.fetch_add(added) + added > max_records) over.store(true);
        return !over.load();
      },
      &bracket);
  return !over.load();
}

// Expert e's tau from its counts and recorded patterns: the (keep - above)-th largest of the
// recorded patterns in its bracket and its heavy patterns, each as often as counted; false when
// tau lies outside the bracket. Linear: the recorded patterns are split at the heavy ones, and
// only the part where the rank falls is searched.
bool exact_tau(const Job& job, const Bracket& br, size_t e, uint64_t keep,
               const std::vector<Records>& recs, uint32_t* tau) {
  uint64_t seen = 0;  // patterns known to lie above the candidates left
  for (const Records& r : recs) seen += r.above[e];
  if (seen >= keep) return false;
  std::vector<std::pair<uint32_t, uint64_t>> heavy;  // (pattern, how many), largest first
  for (size_t k = 0; k < kMaxHeavy; ++k) {
    if (br.heavy[e][k] == kNoPattern) continue;
    uint64_t c = 0;
    for (const Records& r : recs) c += r.heavy[e * kMaxHeavy + k];
    heavy.emplace_back(br.heavy[e][k], c);
  }
  std::sort(heavy.begin(), heavy.end(), std::greater<std::pair<uint32_t, uint64_t>>());
  Scratch sc(0);
  std::vector<uint32_t> u, xs;  // xs: the recorded patterns in the bracket, none of them heavy
  const uint32_t lo = br.lo[e], span = br.hi[e] - br.lo[e];
  for (const Records& r : recs) {
    u.resize(r.pos.size());
    abs_bits_range(r.raw[0].data(), job.bdt, r.raw[1 + e].data(), job.edt[e], u.size(), u.data(),
                   sc);
    for (uint32_t x : u) {
      const auto is_x = [x](const std::pair<uint32_t, uint64_t>& h) { return h.first == x; };
      if (x - lo <= span && std::none_of(heavy.begin(), heavy.end(), is_x)) xs.push_back(x);
    }
  }
  auto rest = xs.begin();
  for (size_t k = 0; k <= heavy.size(); ++k) {
    const auto above_heavy = [&](uint32_t x) { return x > heavy[k].first; };
    const auto end = k < heavy.size() ? std::partition(rest, xs.end(), above_heavy) : xs.end();
    const auto here = static_cast<uint64_t>(end - rest);
    if (seen + here >= keep) {
      const auto nth = rest + static_cast<std::ptrdiff_t>(keep - seen - 1);
      std::nth_element(rest, nth, end, std::greater<uint32_t>());
      *tau = *nth;
      return true;
    }
    seen += here;
    if (k < heavy.size() && (seen += heavy[k].second) >= keep) {
      *tau = heavy[k].first;
      return true;
    }
    rest = end;
  }
  return false;
}

// Write again the recorded elements whose output differs between the guessed and exact
// thresholds, as runs of consecutive positions.
uint64_t patch_records(const Job& job, const StreamFiles& files, const Records& r,
                       const Thresholds& guess,
                       const Thresholds& exact, float lam) {
  const size_t n = job.edt.size();
  const uint64_t nr = r.pos.size();
  if (nr == 0) return 0;
  const DType odt = files.out_dtype();
  const size_t osz = dtype_size(odt);
  std::vector<const unsigned char*> ex;
  for (size_t e = 0; e < n; ++e) ex.push_back(r.raw[1 + e].data());
  std::vector<unsigned char> was(nr * osz), now(nr * osz);
  Scratch sc(n);
  ties_range(r.raw[0].data(), job.bdt, n, ex.data(), job.edt.data(), guess.thr.data(), lam,
             was.data(), odt, static_cast<size_t>(nr), sc);
  ties_range(r.raw[0].data(), job.bdt, n, ex.data(), job.edt.data(), exact.thr.data(), lam,
             now.data(), odt, static_cast<size_t>(nr), sc);
  auto differs = [&](uint64_t i) { return std::memcmp(&was[i * osz], &now[i * osz], osz) != 0; };
  uint64_t patched = 0;
  for (uint64_t i = 0; i < nr;) {
    if (!differs(i)) {
      ++i;
      continue;
    }
    uint64_t j = i + 1;
    while (j < nr && r.pos[j] == r.pos[j - 1] + 1 && differs(j)) ++j;
    files.write(r.pos[i], &now[i * osz], j - i);
    patched += j - i;
    i = j;
  }
  return patched;
}

}  // namespace

bool ties_one_pass(const Job& job, const StreamFiles& files, uint64_t keep, float lam,
                   uint64_t record_budget) {
  if (job.numel < kOnePassMin || keep == 0 || keep >= job.numel || record_budget == 0)
    return false;
  const size_t n = job.edt.size();
  const Bracket br = sample_bracket(job, keep);
  uint64_t rec_bytes = sizeof(uint64_t) + dtype_size(job.bdt);
  for (DType d : job.edt) rec_bytes += dtype_size(d);
  const Thresholds guess = make_thresholds(br.guess);
  std::vector<Records> recs;
  if (!guessed_pass(job, br, guess, lam, files.out_dtype(), record_budget / rec_bytes, &recs)) {
    g_stats.fallback_budget += 1;
    return false;
  }
  std::vector<uint32_t> tau_bits(n);
  for (size_t e = 0; e < n; ++e) {
    if (!exact_tau(job, br, e, keep, recs, &tau_bits[e])) {
      g_stats.fallback_miss += 1;
      return false;
    }
  }
  const Thresholds exact = make_thresholds(tau_bits);
  bool heavy_flips = false;  // a heavy pattern kept under one threshold and not the other
  for (size_t e = 0; e < n; ++e)
    for (uint32_t h : br.heavy[e])
      heavy_flips |= h != kNoPattern && (h >= guess.thr[e]) != (h >= exact.thr[e]);
  uint64_t nrec = 0;
  for (const Records& r : recs) nrec += r.pos.size();
  g_stats.records += nrec;
  if (heavy_flips) {
    recs.clear();
    merge_pass(job, exact, lam, files.out_dtype());
    g_stats.rewritten += 1;
    return true;
  }
  std::atomic<uint64_t> patched{0};
  run_pool(resolve_threads(job.threads, recs.size()), recs.size(), [&](TaskQueue& q) {
    uint64_t t;
    while (q.pop(&t)) patched += patch_records(job, files, recs[t], guess, exact, lam);
  });
  g_stats.one_pass += 1;
  g_stats.patched += patched.load();
  return true;
}

}  // namespace ties_detail

TiesFileStats ties_file_stats() {
  const auto& g = ties_detail::g_stats;
  return TiesFileStats{g.one_pass.load(),        g.rewritten.load(), g.fallback_budget.load(),
                       g.fallback_miss.load(), g.records.load(),   g.patched.load()};
}

}  // namespace lsf
