// Pass 3 of TIES: trim, elect, disjoint mean and output, by portable loops and, for BF16, an
// AVX-512 one; with a bracket, the same loops also do the one pass's bracket test.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "mapped.hpp"
#include "numerics.hpp"
#include "ties.hpp"
#include "ties_internal.hpp"

namespace lsf {
namespace ties_detail {

namespace {

// Experts handled by the fused (unrolled) pass-1 and pass-3 loops; more take the generic ones.
constexpr size_t kMaxFused = 4;

// ---- block loops -------------------------------------------------------------------------------

LSF_INLINE int32_t sgn(float x) {
  return static_cast<int32_t>(x > 0.0f) - static_cast<int32_t>(x < 0.0f);  // 0 for +-0 and NaN
}

// t = d where |d|'s pattern >= thr, else +0.0.
template <DType D>
LSF_INLINE void pass_trim(float* __restrict t, const unsigned char* __restrict p,
                          const float* __restrict b, uint32_t thr, size_t m) {
  for (size_t j = 0; j < m; ++j) {
    const uint32_t db = f32_to_bits(Elem<D>::load(p, j) - b[j]);
    const uint32_t keep = 0u - static_cast<uint32_t>((db & kAbsMask) >= thr);
    t[j] = f32_from_bits(db & keep);
  }
}

LSF_INLINE void pass_elect_init(int32_t* __restrict g, float* __restrict num,
                                int32_t* __restrict cnt, const float* __restrict s, size_t m) {
  for (size_t j = 0; j < m; ++j) {
    g[j] = sgn(s[j]);
    num[j] = 0.0f;
    cnt[j] = 0;
  }
}

LSF_INLINE void pass_agree(float* __restrict num, int32_t* __restrict cnt,
                           const float* __restrict t, const int32_t* __restrict g, size_t m) {
  for (size_t j = 0; j < m; ++j) {
    const float x = t[j];
    const uint32_t agree = static_cast<uint32_t>((sgn(x) == g[j]) & (x != 0.0f));
    num[j] = num[j] + f32_from_bits(f32_to_bits(x) & (0u - agree));  // + x or + (+0.0)
    cnt[j] += static_cast<int32_t>(agree);
  }
}

template <DType D>
LSF_INLINE void pass_finish(unsigned char* __restrict out, const float* __restrict b,
                            const float* __restrict num, const int32_t* __restrict cnt, float lam,
                            size_t m) {
  for (size_t j = 0; j < m; ++j) {
    // cnt == 0 leaves num at exactly +0.0 (only +0.0 was added), and +0.0 / 1 is the 0.0 the
    // contract asks for: the same value as `cnt > 0 ? num / cnt : 0.0f`, without a branch.
    const int32_t c = cnt[j] > 0 ? cnt[j] : 1;
    const float mean = num[j] / static_cast<float>(c);
    const float prod = lam * mean;
    Elem<D>::store(out, j, b[j] + prod);
  }
}

// Steps 3-5 for N experts at once from their trimmed deltas t (N x kBlk): the same float32
// operations in the same order as pass_elect_init, pass_agree and pass_finish.
template <size_t N, DType D>
LSF_INLINE void pass_merge_fused(unsigned char* __restrict out, const float* __restrict b,
                                 const float* __restrict t, float lam, size_t m) {
  for (size_t j = 0; j < m; ++j) {
    float s = t[j];
    for (size_t e = 1; e < N; ++e) s = s + t[e * kBlk + j];
    const int32_t g = sgn(s);
    float num = 0.0f;
    int32_t cnt = 0;
    for (size_t e = 0; e < N; ++e) {
      const float x = t[e * kBlk + j];
      const uint32_t agree = static_cast<uint32_t>((sgn(x) == g) & (x != 0.0f));
      num = num + f32_from_bits(f32_to_bits(x) & (0u - agree));
      cnt += static_cast<int32_t>(agree);
    }
    const int32_t c = cnt > 0 ? cnt : 1;
    const float mean = num / static_cast<float>(c);
    const float prod = lam * mean;
    Elem<D>::store(out, j, b[j] + prod);
  }
}

// Steps 1-5 in one loop, without scratch, when base, the N experts and the output all have the
// dtype D: the same float32 operations as pass_to_f32, pass_trim and pass_merge_fused. With
// H >= 0, the same loop also does what pass_bracket does for each expert's side, while |d| is
// at hand (a separate pass would convert and subtract every input again), comparing with only
// the first H heavy patterns: the others are all unused (kNoPattern).
template <size_t N, DType D, int H>
LSF_INLINE void ties_uniform(unsigned char* __restrict out, const unsigned char* __restrict base,
                             const unsigned char* const* ex, const uint32_t* thr, float lam,
                             size_t n, const BracketSide* sides, uint8_t* __restrict flags) {
  static_assert(H <= static_cast<int>(kMaxHeavy), "at most kMaxHeavy heavy patterns");
  constexpr bool Bracket = H >= 0;
  constexpr size_t kH = H > 0 ? static_cast<size_t>(H) : 0;
  const unsigned char* p[N];
  uint32_t th[N], lo[N], span[N], hi[N], hv[N][kMaxHeavy];
  uint32_t above[N], hc[N][kMaxHeavy];
  for (size_t e = 0; e < N; ++e) {
    p[e] = ex[e];
    th[e] = thr[e];
    above[e] = 0;
    for (size_t k = 0; k < kMaxHeavy; ++k) hc[e][k] = 0;
    if constexpr (Bracket) {
      lo[e] = sides[e].lo;
      hi[e] = sides[e].hi;
      span[e] = sides[e].hi - sides[e].lo;
      for (size_t k = 0; k < kH; ++k) hv[e][k] = sides[e].heavy[k];
    }
  }
  for (size_t j = 0; j < n; ++j) {
    const float b = Elem<D>::load(base, j);
    float t[N];
    uint32_t flag = 0;
    for (size_t e = 0; e < N; ++e) {
      const uint32_t db = f32_to_bits(Elem<D>::load(p[e], j) - b);
      const uint32_t x = db & kAbsMask;
      const uint32_t keep = 0u - static_cast<uint32_t>(x >= th[e]);
      t[e] = f32_from_bits(db & keep);
      if constexpr (Bracket) {
        uint32_t heavy = 0;
        for (size_t k = 0; k < kH; ++k) {
          const uint32_t eq = x == hv[e][k];
          hc[e][k] += eq;
          heavy |= eq;
        }
        above[e] += static_cast<uint32_t>(x > hi[e]);
        flag |= static_cast<uint32_t>(x - lo[e] <= span[e]) & ~heavy;
      }
    }
    if constexpr (Bracket) flags[j] = static_cast<uint8_t>(flag);
    float s = t[0];
    for (size_t e = 1; e < N; ++e) s = s + t[e];
    const int32_t g = sgn(s);
    float num = 0.0f;
    int32_t cnt = 0;
    for (size_t e = 0; e < N; ++e) {
      const uint32_t agree = static_cast<uint32_t>((sgn(t[e]) == g) & (t[e] != 0.0f));
      num = num + f32_from_bits(f32_to_bits(t[e]) & (0u - agree));
      cnt += static_cast<int32_t>(agree);
    }
    const int32_t c = cnt > 0 ? cnt : 1;
    const float mean = num / static_cast<float>(c);
    const float prod = lam * mean;
    Elem<D>::store(out, j, b + prod);
  }
  if constexpr (Bracket) {
    for (size_t e = 0; e < N; ++e) {
      *sides[e].above += above[e];
      for (size_t k = 0; k < kH; ++k) sides[e].counts[k] += hc[e][k];
    }
  }
}

// ---- AVX-512 loop for BF16 ----------------------------------------------------------------------
//
// GCC's own vectorisation of ties_uniform turns every comparison into a vector of 0/1, moves
// masks through general registers and divides every vector. Written with the comparisons kept in
// mask registers, and dividing only vectors where some element needs it, the BF16 loop (the
// common case: 16-bit checkpoints) makes a one-pass TIES of a 2048x5632 tensor x 3 experts take
// ~10% less CPU. The float32 operations are the same, in the same order, so the bytes are too:
// tests run both loops.

std::atomic<bool> g_simd_enabled{true};

#if defined(__x86_64__) && defined(__GNUC__)
// GCC 12 reports hundreds of false (maybe-)uninitialized warnings from inside the AVX-512
// intrinsic headers; they would bury real ones.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

bool simd_bf16() { return cpu_has_avx512() && g_simd_enabled.load(std::memory_order_relaxed); }

LSF_AVX512 inline __m512 bf16x16_load(const unsigned char* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// f32_to_bf16 for 16 lanes.
LSF_AVX512 inline __m256i bf16x16_round(__m512 r) {
  const __m512i u = _mm512_castps_si512(r);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i up = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb);
  const __mmask16 nan = _mm512_cmp_ps_mask(r, r, _CMP_UNORD_Q);
  const __m512i v =
      _mm512_mask_mov_epi32(_mm512_srli_epi32(up, 16), nan, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(v);
}

// ties_uniform<N, BF16, H> for n elements, 16 at a time (the rest by ties_uniform).
template <size_t N, int H>
LSF_AVX512 void ties_bf16_avx512(unsigned char* out, const unsigned char* base,
                                 const unsigned char* const* ex, const uint32_t* thr, float lam,
                                 size_t n, const BracketSide* sides, uint8_t* flags) {
  constexpr bool Bracket = H >= 0;
  constexpr size_t kH = H > 0 ? static_cast<size_t>(H) : 0;
  const __m512i one = _mm512_set1_epi32(1), two = _mm512_set1_epi32(2);
  const __m512i abs_mask = _mm512_set1_epi32(kAbsMask);
  const __m512 zero = _mm512_setzero_ps(), half = _mm512_set1_ps(0.5f), vlam = _mm512_set1_ps(lam);
  __m512i th[N], lo[N], span[N], hi[N], hv[N][kMaxHeavy], above[N], hc[N][kMaxHeavy];
  for (size_t e = 0; e < N; ++e) {
    th[e] = _mm512_set1_epi32(static_cast<int>(thr[e]));
    above[e] = _mm512_setzero_si512();
    for (size_t k = 0; k < kMaxHeavy; ++k) hc[e][k] = _mm512_setzero_si512();
    if constexpr (Bracket) {
      lo[e] = _mm512_set1_epi32(static_cast<int>(sides[e].lo));
      hi[e] = _mm512_set1_epi32(static_cast<int>(sides[e].hi));
      span[e] = _mm512_set1_epi32(static_cast<int>(sides[e].hi - sides[e].lo));
      for (size_t k = 0; k < kH; ++k)
        hv[e][k] = _mm512_set1_epi32(static_cast<int>(sides[e].heavy[k]));
    }
  }
  size_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 b = bf16x16_load(base + 2 * j);
    __m512 t[N];
    __mmask16 flag = 0;
    for (size_t e = 0; e < N; ++e) {
      const __m512i db = _mm512_castps_si512(_mm512_sub_ps(bf16x16_load(ex[e] + 2 * j), b));
      const __m512i x = _mm512_and_si512(db, abs_mask);
      t[e] = _mm512_castsi512_ps(_mm512_maskz_mov_epi32(_mm512_cmpge_epu32_mask(x, th[e]), db));
      if constexpr (Bracket) {
        __mmask16 heavy = 0;
        for (size_t k = 0; k < kH; ++k) {
          const __mmask16 eq = _mm512_cmpeq_epi32_mask(x, hv[e][k]);
          hc[e][k] = _mm512_mask_add_epi32(hc[e][k], eq, hc[e][k], one);
          heavy = _kor_mask16(heavy, eq);
        }
        const __mmask16 up = _mm512_cmpgt_epu32_mask(x, hi[e]);
        above[e] = _mm512_mask_add_epi32(above[e], up, above[e], one);
        const __mmask16 in = _mm512_cmple_epu32_mask(_mm512_sub_epi32(x, lo[e]), span[e]);
        flag = _kor_mask16(flag, _kandn_mask16(heavy, in));
      }
    }
    __m512 s = t[0];
    for (size_t e = 1; e < N; ++e) s = _mm512_add_ps(s, t[e]);
    // pass_agree's sgn(t) == sgn(s) and t != 0, sgn being 0 for +-0 and NaN: t and s both
    // positive, both negative, or t NaN while s is +-0 or NaN.
    const __mmask16 s_pos = _mm512_cmp_ps_mask(s, zero, _CMP_GT_OQ);
    const __mmask16 s_neg = _mm512_cmp_ps_mask(s, zero, _CMP_LT_OQ);
    const __mmask16 s_none = _knot_mask16(_kor_mask16(s_pos, s_neg));
    __m512 num = zero;
    __m512i cnt = _mm512_setzero_si512();
    for (size_t e = 0; e < N; ++e) {
      const __mmask16 agree = _kor_mask16(
          _kor_mask16(_mm512_mask_cmp_ps_mask(s_pos, t[e], zero, _CMP_GT_OQ),
                      _mm512_mask_cmp_ps_mask(s_neg, t[e], zero, _CMP_LT_OQ)),
          _mm512_mask_cmp_ps_mask(s_none, t[e], t[e], _CMP_UNORD_Q));
      num = _mm512_add_ps(num, _mm512_maskz_mov_ps(agree, t[e]));  // + t or + (+0.0)
      cnt = _mm512_mask_add_epi32(cnt, agree, cnt, one);
    }
    // num / max(cnt, 1). Dividing by 1 or 2 is exactly multiplying by 1 or 0.5, so the slow
    // division runs only for vectors where some element has three or more agreeing experts.
    __m512 mean;
    if (_mm512_cmpgt_epi32_mask(cnt, two))
      mean = _mm512_div_ps(num, _mm512_cvtepi32_ps(_mm512_max_epi32(cnt, one)));
    else
      mean = _mm512_mask_mul_ps(num, _mm512_cmpeq_epi32_mask(cnt, two), num, half);
    const __m512 r = _mm512_add_ps(b, _mm512_mul_ps(vlam, mean));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 2 * j), bf16x16_round(r));
    if constexpr (Bracket)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(flags + j), _mm_maskz_set1_epi8(flag, 1));
  }
  if constexpr (Bracket) {
    for (size_t e = 0; e < N; ++e) {
      *sides[e].above += static_cast<uint32_t>(_mm512_reduce_add_epi32(above[e]));
      for (size_t k = 0; k < kH; ++k)
        sides[e].counts[k] += static_cast<uint32_t>(_mm512_reduce_add_epi32(hc[e][k]));
    }
  }
  if (j == n) return;
  const unsigned char* rest[N];
  for (size_t e = 0; e < N; ++e) rest[e] = ex[e] + 2 * j;
  ties_uniform<N, DType::BF16, H>(out + 2 * j, base + 2 * j, rest, thr, lam, n - j, sides,
                                  Bracket ? flags + j : nullptr);
}
#pragma GCC diagnostic pop
#else
bool simd_bf16() { return false; }
template <size_t N, int H>
void ties_bf16_avx512(unsigned char*, const unsigned char*, const unsigned char* const*,
                      const uint32_t*, float, size_t, const BracketSide*, uint8_t*) {}
#endif

template <size_t N, DType D, int H>
LSF_INLINE void ties_uniform_pick(unsigned char* out, const unsigned char* base,
                                  const unsigned char* const* ex, const uint32_t* thr, float lam,
                                  size_t n, const BracketSide* sides, uint8_t* flags) {
  if constexpr (D == DType::BF16) {
    if (simd_bf16()) return ties_bf16_avx512<N, H>(out, base, ex, thr, lam, n, sides, flags);
  }
  ties_uniform<N, D, H>(out, base, ex, thr, lam, n, sides, flags);
}

// ties_uniform with the bracket test (when sides are given) over as many heavy patterns as the
// experts use.
template <size_t N, DType D>
LSF_INLINE void ties_uniform_any(unsigned char* out, const unsigned char* base,
                                 const unsigned char* const* ex, const uint32_t* thr, float lam,
                                 size_t n, const BracketSide* sides, uint8_t* flags) {
  if (sides == nullptr)
    return ties_uniform_pick<N, D, -1>(out, base, ex, thr, lam, n, sides, flags);
  size_t used = 0;  // heavy patterns are stored first, unused slots last
  for (size_t e = 0; e < N; ++e)
    for (size_t k = 0; k < kMaxHeavy; ++k)
      if (sides[e].heavy[k] != kNoPattern) used = std::max(used, k + 1);
  switch (used) {
    case 0: return ties_uniform_pick<N, D, 0>(out, base, ex, thr, lam, n, sides, flags);
    case 1: return ties_uniform_pick<N, D, 1>(out, base, ex, thr, lam, n, sides, flags);
    case 2: return ties_uniform_pick<N, D, 2>(out, base, ex, thr, lam, n, sides, flags);
    default: return ties_uniform_pick<N, D, 4>(out, base, ex, thr, lam, n, sides, flags);
  }
}

template <DType D>
LSF_INLINE void pass_bracket(uint32_t* __restrict f, const unsigned char* __restrict p,
                             const float* __restrict b, const BracketSide& side, size_t m) {
  static_assert(kMaxHeavy == 4, "pass_bracket compares with four heavy patterns");
  const uint32_t lo = side.lo, hi = side.hi, span = hi - lo;
  const uint32_t h0 = side.heavy[0], h1 = side.heavy[1], h2 = side.heavy[2], h3 = side.heavy[3];
  uint32_t above = 0, c0 = 0, c1 = 0, c2 = 0, c3 = 0;
  for (size_t j = 0; j < m; ++j) {
    const uint32_t x = f32_to_bits(Elem<D>::load(p, j) - b[j]) & kAbsMask;
    const uint32_t e0 = x == h0, e1 = x == h1, e2 = x == h2, e3 = x == h3;
    c0 += e0;
    c1 += e1;
    c2 += e2;
    c3 += e3;
    above += static_cast<uint32_t>(x > hi);
    f[j] |= static_cast<uint32_t>(x - lo <= span) & ~(e0 | e1 | e2 | e3);
  }
  *side.above += above;
  side.counts[0] += c0;
  side.counts[1] += c1;
  side.counts[2] += c2;
  side.counts[3] += c3;
}

}  // namespace

// Pass 3: trim, elect, disjoint mean and output for n consecutive elements; with sides, also the
// bracket test: flags[j] = 1 where some expert's |d| pattern lies in its bracket and is not one of
// its heavy patterns (n bytes), and each side's counts.
LSF_CLONES
void ties_range(const unsigned char* base, DType bdt, size_t n_ex, const unsigned char* const* ex,
                const DType* edt, const uint32_t* thr, float lam, unsigned char* out, DType odt,
                size_t n, Scratch& sc, const BracketSide* sides, uint8_t* flags) {
  float* bf = sc.base();
  float* s_ = sc.sum();
  float* num = sc.num();
  int32_t* g = sc.gamma();
  int32_t* cnt = sc.cnt();
  const size_t bsz = dtype_size(bdt);
  const size_t osz = dtype_size(odt);
  const bool uniform =
      odt == bdt && std::all_of(edt, edt + n_ex, [&](DType d) { return d == bdt; });
  if (n_ex <= kMaxFused && uniform) {
#define LSF_UNIFORM(N) \
  LSF_DTYPE_DISPATCH(odt, D, ties_uniform_any<N, D>(out, base, ex, thr, lam, n, sides, flags))
    switch (n_ex) {
      case 1: LSF_UNIFORM(1); break;
      case 2: LSF_UNIFORM(2); break;
      case 3: LSF_UNIFORM(3); break;
      default: LSF_UNIFORM(4); break;
    }
#undef LSF_UNIFORM
    return;
  }
  for (size_t s = 0; s < n; s += kBlk) {
    const size_t m = std::min(kBlk, n - s);
    LSF_DTYPE_DISPATCH(bdt, DB, pass_to_f32<DB>(bf, base + s * bsz, m));
    for (size_t e = 0; e < n_ex; ++e) {
      const unsigned char* p = ex[e] + s * dtype_size(edt[e]);
      LSF_DTYPE_DISPATCH(edt[e], DI, pass_trim<DI>(sc.t(e), p, bf, thr[e], m));
    }
    if (sides != nullptr) {  // on the block just converted, while it is in L1
      uint32_t* f32 = sc.bits();
      std::fill(f32, f32 + m, uint32_t{0});
      for (size_t e = 0; e < n_ex; ++e) {
        const unsigned char* p = ex[e] + s * dtype_size(edt[e]);
        LSF_DTYPE_DISPATCH(edt[e], DI, pass_bracket<DI>(f32, p, bf, sides[e], m));
      }
      for (size_t j = 0; j < m; ++j) flags[s + j] = static_cast<uint8_t>(f32[j]);
    }
    unsigned char* o = out + s * osz;
    if (n_ex <= kMaxFused) {
      const float* t = sc.t(0);
      switch (n_ex) {
        case 1: LSF_DTYPE_DISPATCH(odt, DO, pass_merge_fused<1, DO>(o, bf, t, lam, m)); break;
        case 2: LSF_DTYPE_DISPATCH(odt, DO, pass_merge_fused<2, DO>(o, bf, t, lam, m)); break;
        case 3: LSF_DTYPE_DISPATCH(odt, DO, pass_merge_fused<3, DO>(o, bf, t, lam, m)); break;
        default: LSF_DTYPE_DISPATCH(odt, DO, pass_merge_fused<4, DO>(o, bf, t, lam, m)); break;
      }
      continue;
    }
    // s = t_0 + t_1 + ... in input order, starting from t_0.
    {
      const float* t0 = sc.t(0);
      for (size_t j = 0; j < m; ++j) s_[j] = t0[j];
      for (size_t e = 1; e < n_ex; ++e) {
        const float* te = sc.t(e);
        for (size_t j = 0; j < m; ++j) s_[j] = s_[j] + te[j];
      }
    }
    pass_elect_init(g, num, cnt, s_, m);
    for (size_t e = 0; e < n_ex; ++e) pass_agree(num, cnt, sc.t(e), g, m);
    LSF_DTYPE_DISPATCH(odt, DO, pass_finish<DO>(o, bf, num, cnt, lam, m));
  }
}

// Pass 3.
void merge_pass(const Job& job, const Thresholds& th, float lam, DType odt,
                const AfterChunk& after, ChunkBracket* bracket) {
  const size_t n = job.edt.size();
  const uint64_t numel = job.numel;
  const uint64_t task = job.task;
  const uint64_t ntasks = (numel + task - 1) / task;
  const size_t nthreads = pass_threads(job);
  const std::vector<char> use(n, 1);
  std::vector<std::unique_ptr<Chunks>> chs;
  std::vector<std::unique_ptr<Scratch>> scs;
  for (size_t i = 0; i < nthreads; ++i) {
    chs.push_back(job.make(use, true));
    scs.emplace_back(new Scratch(n));
  }
  std::atomic<size_t> slots{0};
  run_pool(nthreads, ntasks, [&](TaskQueue& q) {
    const size_t slot = slots.fetch_add(1);
    Chunks& ch = *chs[slot];
    uint64_t t;
    while (q.pop(&t)) {
      const uint64_t e0 = t * task;
      const uint64_t m = std::min(task, numel - e0);
      ch.load(e0, m);
      unsigned char* o = ch.out_begin(e0);
      const BracketSide* sides = bracket ? bracket->sides[slot].data() : nullptr;
      uint8_t* flags = bracket ? bracket->flags[slot].get() : nullptr;
      if (flags) std::memset(flags + m, 0, 8);
      Scratch& sc = *scs[slot];
      recoverable([&] {
        ties_range(ch.base, job.bdt, n, ch.ex.data(), job.edt.data(), th.thr.data(), lam, o, odt,
                   static_cast<size_t>(m), sc, sides, flags);
      });
      ch.out_end(e0, m);
      if (after && !after(slot, e0, m, ch)) {
        q.stop();
        break;
      }
    }
  });
}

}  // namespace ties_detail

void set_ties_simd_enabled(bool enabled) { ties_detail::g_simd_enabled.store(enabled); }

}  // namespace lsf
