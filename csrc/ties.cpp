#include "ties.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "chunk_reader.hpp"
#include "kernel_util.hpp"
#include "numerics.hpp"

namespace lsf {

namespace {

constexpr size_t kBlk = 1024;            // elements per block (float32 scratch per thread)
constexpr uint64_t kTask = 1ULL << 16;   // elements per task of the in-memory drivers
// ties_file reads chunks of at most about this many bytes per thread (base, experts and output
// together; chunk_elems may ask for fewer): they are still in the L2 cache when the kernels read
// them, and pread copies into cached buffers faster. Results do not depend on the chunk size.
constexpr uint64_t kChunkBytes = 1ULL << 20;
constexpr size_t kHiBins = size_t{1} << 15;  // top 16 bits of |d| (its sign bit is always 0)
constexpr size_t kLoBins = size_t{1} << 16;  // low 16 bits
constexpr uint32_t kAbsMask = 0x7FFFFFFFu;
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
// Experts handled by the fused (unrolled) pass-1 and pass-3 loops; more take the generic ones.
constexpr size_t kMaxFused = 4;
// Heavy patterns per expert of the one-pass bracket (see "one pass over a sampled bracket").
constexpr size_t kMaxHeavy = 4;
constexpr uint32_t kNoPattern = 0xFFFFFFFFu;  // no |d| pattern (their sign bit is 0)

// ---- block loops -------------------------------------------------------------------------------

LSF_INLINE int32_t sgn(float x) {
  return static_cast<int32_t>(x > 0.0f) - static_cast<int32_t>(x < 0.0f);  // 0 for +-0 and NaN
}

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

// One expert's bracket in a pass: patterns in [lo, hi] are flagged for recording, except the
// kMaxHeavy "heavy" patterns (values many elements share, as in 16-bit checkpoints; unused slots
// hold 0xFFFFFFFF, which no |d| pattern equals), which are counted instead.
struct BracketSide {
  uint32_t lo, hi;
  const uint32_t* heavy;  // kMaxHeavy patterns
  uint64_t* above;        // += patterns above hi
  uint64_t* counts;       // [k] += patterns equal to heavy[k]
};

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
#define LSF_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

bool simd_bf16() {
  static const bool cpu = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return cpu && g_simd_enabled.load(std::memory_order_relaxed);
}

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

// Pass 3: trim, elect, disjoint mean and output for n consecutive elements; with sides, also the
// bracket test: flags[j] = 1 where some expert's |d| pattern lies in its bracket and is not one of
// its heavy patterns (n bytes), and each side's counts.
LSF_CLONES
void ties_range(const unsigned char* base, DType bdt, size_t n_ex, const unsigned char* const* ex,
                const DType* edt, const uint32_t* thr, float lam, unsigned char* out, DType odt,
                size_t n, Scratch& sc, const BracketSide* sides = nullptr,
                uint8_t* flags = nullptr) {
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
    base = r_.in()[0];
    ex.assign(r_.in() + 1, r_.in() + f.size());
  }
  void load(uint64_t e0, uint64_t m) override { r_.load(e0, m); }
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

// ---- the passes --------------------------------------------------------------------------------

struct Thresholds {
  std::vector<float> tau;    // the reported threshold per expert
  std::vector<uint32_t> thr; // keep iff the pattern of |d| >= thr
};

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

Thresholds make_thresholds(const std::vector<uint32_t>& tau_bits) {
  Thresholds r;
  for (uint32_t b : tau_bits) {
    r.tau.push_back(f32_from_bits(b));
    r.thr.push_back(std::min(b, kNanThr));
  }
  return r;
}

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
  const uint64_t numel = job.numel;
  const uint64_t task = job.task;
  const uint64_t ntasks = (numel + task - 1) / task;
  const size_t nthreads = resolve_threads(job.threads, ntasks);

  // Pass 1: pass-1 keys counted per thread, then folded over the bins they touched. The
  // per-thread resources of every pass are allocated here, on the calling thread (from BufPool).
  std::vector<uint32_t> tau_bits(n, 0);
  std::vector<uint32_t> hi(n, 0);
  std::vector<uint64_t> k_in(n, 0);
  std::vector<size_t> pending;
  {
    const std::vector<char> use(n, 1);
    const uint64_t per_slot = static_cast<uint64_t>(n) * kSub * kKeys;
    auto counts = alloc_array<uint32_t>(nthreads * per_slot, "ties histograms");
    std::vector<std::unique_ptr<HiLocal>> hl;
    std::vector<std::unique_ptr<Chunks>> chs;
    std::vector<std::unique_ptr<Scratch>> scs;
    for (size_t i = 0; i < nthreads; ++i) {
      hl.emplace_back(new HiLocal(n, counts.get() + i * per_slot));
      chs.push_back(job.make(use, false));
      scs.emplace_back(new Scratch(0, n));
    }
    std::atomic<size_t> slots{0};
    run_pool(nthreads, ntasks, [&](TaskQueue& q) {
      const size_t slot = slots.fetch_add(1);
      HiLocal& h = *hl[slot];
      Chunks& ch = *chs[slot];
      h.clear();
      uint64_t t;
      while (q.pop(&t)) {
        const uint64_t e0 = t * task;
        const uint64_t m = std::min(task, numel - e0);
        ch.load(e0, m);
        hist_hi_range(ch.base, job.bdt, n, ch.ex.data(), job.edt.data(), static_cast<size_t>(m),
                      h, *scs[slot]);
      }
    });
    const size_t used = std::min(slots.load(), nthreads);  // slots whose counts were cleared
    std::vector<HiBin> total;  // bin 0, then bins [lo, top]
    for (size_t e = 0; e < n; ++e) {
      uint32_t lo = kHiBins, top = 0;
      for (size_t i = 0; i < used; ++i) {
        lo = std::min(lo, hl[i]->range_lo(e));
        top = std::max(top, hl[i]->range_hi(e));
      }
      if (lo > top) lo = top = 1;  // every |d| in bin 0
      total.assign(top - lo + 2, HiBin{0, 0});
      for (size_t i = 0; i < used; ++i) hl[i]->fold_into(e, &total[0], &total[1], lo);
      uint32_t sel_i = 0;
      select_bin(total.size(), [&](size_t b) { return total[b].cnt; }, keep, &sel_i, &k_in[e]);
      const HiBin sel = total[sel_i];
      hi[e] = sel_i == 0 ? 0 : sel_i - 1 + lo;
      if (k_in[e] > sel.cnt - sel.lo_zero) {
        tau_bits[e] = hi[e] << 16;  // the k_in-th largest of the bin has low bits 0
      } else {
        pending.push_back(e);
      }
    }
  }

  // Pass 2: low 16 bits of the elements in the selected bin, for the experts still open.
  if (!pending.empty()) {
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
      phi.push_back(hi[e]);
    }
    std::vector<std::unique_ptr<Chunks>> chs;
    std::vector<std::unique_ptr<Scratch>> scs;
    for (size_t i = 0; i < nthreads; ++i) {
      chs.push_back(job.make(use, false));
      scs.emplace_back(new Scratch(0));
    }
    std::atomic<size_t> slots{0};
    run_pool(nthreads, ntasks, [&](TaskQueue& q) {
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
        hist_lo_range(ch.base, job.bdt, np, ptrs.data(), pdt.data(), phi.data(),
                      static_cast<size_t>(m), h, *scs[slot]);
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
      select_bin(kLoBins, [&](size_t b) { return h[b]; }, k_in[e], &lo, &unused);
      tau_bits[e] = (hi[e] << 16) | lo;
    }
  }

  return make_thresholds(tau_bits);
}

// Threads of a pass over job: at most one per task.
size_t pass_threads(const Job& job) {
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

// Pass 3.
void merge_pass(const Job& job, const Thresholds& th, float lam, DType odt,
                const AfterChunk& after = nullptr, ChunkBracket* bracket = nullptr) {
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
      ties_range(ch.base, job.bdt, n, ch.ex.data(), job.edt.data(), th.thr.data(), lam, o, odt,
                 static_cast<size_t>(m), *scs[slot], sides, flags);
      ch.out_end(e0, m);
      if (after && !after(slot, e0, m, ch)) {
        q.stop();
        break;
      }
    }
  });
}

// ---- one pass over a sampled bracket (ties_file) ------------------------------------------------
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
      for (size_t e = 0; e < n; ++e)
        abs_bits_range(ch->base, job.bdt, ch->ex[e], job.edt[e], static_cast<size_t>(m),
                       keys[e].data() + i * kSampleBlk + o, sc);
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
    const unsigned char* src = in == 0 ? ch.base : ch.ex[in - 1];
    std::vector<unsigned char>& dst = rec.raw[in];
    const size_t sz = dtype_size(dt);
    dst.resize((old + idx.size()) * sz);
    unsigned char* d = dst.data() + old * sz;
    if (sz == 2) {
      for (size_t i = 0; i < idx.size(); ++i) std::memcpy(d + 2 * i, src + 2 * idx[i], 2);
    } else {
      for (size_t i = 0; i < idx.size(); ++i) std::memcpy(d + 4 * i, src + 4 * idx[i], 4);
    }
  }
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

// ties_file in one pass when it can; false when the exact passes must (re)write the output.
bool ties_one_pass(const Job& job, const StreamFiles& files, uint64_t keep, float lam,
                   uint64_t record_budget) {
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
  if (numel >= kOnePassMin && keep > 0 && keep < numel && record_budget > 0 &&
      ties_one_pass(job, files, keep, lam, record_budget))
    return;
  Thresholds th = select_thresholds(job, keep);
  merge_pass(job, th, lam, out_dt);
}

void set_ties_simd_enabled(bool enabled) { g_simd_enabled.store(enabled); }

TiesFileStats ties_file_stats() {
  return TiesFileStats{g_stats.one_pass.load(),        g_stats.rewritten.load(),
                       g_stats.fallback_budget.load(), g_stats.fallback_miss.load(),
                       g_stats.records.load(),         g_stats.patched.load()};
}

}  // namespace lsf
