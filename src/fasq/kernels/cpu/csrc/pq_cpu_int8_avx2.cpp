// The int8 decode kernels on AVX2 (CPUs without AVX-512 VBMI: Intel before Ice Lake, AMD
// before Zen 4); one instruction set per file. Same prepared layouts as the AVX-512 kernels
// (pq_cpu_int8.cpp's header comment), so a layer prepared once runs on either:
//   - a 64-byte step of codes (16 rows x 4 bytes) is read as two 32-byte halves of 8 rows;
//   - lookups by vpshufb in 16-entry tables (one instruction per 32 codes), so only d=1 and
//     d=2 with K <= 16 are looked up (a 64- or 256-entry table would take 4-16 of them); the
//     8-bit grid's codes are their own values;
//   - products by vpmaddubsw (unsigned x signed bytes, pairs summed into 16 bits with
//     saturation) and vpmaddwd by ones into 32 bits. How each codebook's bytes are multiplied
//     without saturating: SignMode in pq_cpu_int8.h (RTN's small grids as they are, four units
//     summed in 16 bits; other tables as |w| times x with w's sign);
//   - up to NT_MAX_AVX2 tokens a pass (16 ymm registers hold 2 halves x 4 tokens of sums).
// The activation blocks, their steps and the shift removed per run are the AVX-512 kernels'
// (the same emulation in tests/test_cpu_int8.py checks both).

#include <stdint.h>

#include "pq_cpu_int8.h"

#if FASQ_X86
#define FASQ_INLINE inline __attribute__((always_inline))

// 64-byte code steps prefetched ahead, as the AVX-512 kernels (2 KiB).
#ifndef FASQ_PFD
#define FASQ_PFD 32
#endif

namespace fasq_int8 {
namespace {

using fasq_cpu::CB_F32;  // dtype codes of x
using fasq_cpu::CB_F16;

bool cpu_has_avx2() {
  static const bool has =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return has;
}

// The families below turn 32 bytes of codes (one half of a 64-byte step: 8 rows) into UPS
// units: registers of 8 rows x 4 columns as signed (or, SMALL, unsigned) bytes, each dotted
// with 4 activation bytes. load() takes codebook c's table, its bytes XORed with `flip`
// (0x80 for SIGNED_SHIFTED: the bytes back to signed values).

// d=2, K <= 16 (PAIRS): 4 subspaces of 8 rows; unit 0 their first values, unit 1 their
// second ones (tables [C][2][256]: the first 16 entries of each, in both 128-bit lanes).
struct PairUnits16 {
  static constexpr int UPS = 2, SUBSPACES = 4;
  __m256i ta, tb;
  FASQ_AVX2 FASQ_INLINE void load(const uint8_t* tabs, int64_t c, __m256i flip) {
    const __m128i* tp = reinterpret_cast<const __m128i*>(tabs + c * 512);
    ta = _mm256_xor_si256(_mm256_broadcastsi128_si256(_mm_loadu_si128(tp)), flip);
    tb = _mm256_xor_si256(_mm256_broadcastsi128_si256(_mm_loadu_si128(tp + 16)), flip);
  }
  FASQ_AVX2 FASQ_INLINE void units(__m256i idx, __m256i* w) const {
    w[0] = _mm256_shuffle_epi8(ta, idx), w[1] = _mm256_shuffle_epi8(tb, idx);
  }
};

// d=1, K <= 16 (NIBBLES): 8 columns of 8 rows, two codes a byte; unit 0 the low halves
// (columns 0-3), unit 1 the high ones (4-7). The table [C][64] repeats the 16 values, so its
// first 32 bytes fill both lanes.
struct NibbleUnits16 {
  static constexpr int UPS = 2, SUBSPACES = 8;
  __m256i tab;
  FASQ_AVX2 FASQ_INLINE void load(const uint8_t* tabs, int64_t c, __m256i flip) {
    tab = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tabs + c * 64)), flip);
  }
  FASQ_AVX2 FASQ_INLINE void units(__m256i idx, __m256i* w) const {
    const __m256i low = _mm256_set1_epi8(15);
    w[0] = _mm256_shuffle_epi8(tab, _mm256_and_si256(idx, low));
    w[1] = _mm256_shuffle_epi8(tab, _mm256_and_si256(_mm256_srli_epi16(idx, 4), low));
  }
};

// d=1, the 8-bit grid (BYTES): 4 columns of 8 rows; a code is its unsigned value, flipped to
// value - 128 (always SIGNED_SHIFTED).
struct ByteUnits {
  static constexpr int UPS = 1, SUBSPACES = 4;
  __m256i flip;
  FASQ_AVX2 FASQ_INLINE void load(const uint8_t*, int64_t, __m256i f) { flip = f; }
  FASQ_AVX2 FASQ_INLINE void units(__m256i idx, __m256i* w) const { w[0] = _mm256_xor_si256(idx, flip); }
};

// One activation block: NU units per half (4: 16 columns; 2: a run's last 8) from the steps
// at `code`, then per token and half racc[t][h] += float(its int32 dot product) * the
// block's step. SMALL: units of unsigned bytes <= 32, their products summed in 16 bits
// (4 x 2 x 32 x 127 < 2^15); else signed units as |w| x (x with w's sign), plus `back` (128
// for SIGNED_SHIFTED tables, else 0) x the block's int8 sum: the dot product of the table's
// own bytes, as the AVX-512 kernels compute it.
template <int NT, int NU, class U, bool SMALLW>
FASQ_AVX2 FASQ_INLINE void block(const U& u, const uint8_t* code, const int8_t* xq, int64_t in, const float* xs,
                                 const int32_t* xb, int32_t back, int64_t nblk, __m256 (&racc)[NT][2]) {
  constexpr int NS = NU / U::UPS;  // 64-byte steps
  const __m256i ones = _mm256_set1_epi16(1);
  for (int s = 0; s < NS; s++) _mm_prefetch(reinterpret_cast<const char*>(code + (s + FASQ_PFD) * 64), _MM_HINT_T0);
  for (int h = 0; h < 2; h++) {
    __m256i w[NU], a[NU];
    for (int s = 0; s < NS; s++)
      u.units(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(code + s * 64 + h * 32)), w + s * U::UPS);
    if (!SMALLW)
      for (int j = 0; j < NU; j++) a[j] = _mm256_abs_epi8(w[j]);
    for (int t = 0; t < NT; t++) {
      const int32_t* xp = reinterpret_cast<const int32_t*>(xq + t * in);
      __m256i acc;
      if (SMALLW) {
        __m256i s16 = _mm256_maddubs_epi16(w[0], _mm256_set1_epi32(xp[0]));
        for (int j = 1; j < NU; j++) s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(w[j], _mm256_set1_epi32(xp[j])));
        acc = _mm256_madd_epi16(s16, ones);
      } else {
        auto dot = [&](int j) FASQ_AVX2 {
          const __m256i xs_j = _mm256_sign_epi8(_mm256_set1_epi32(xp[j]), w[j]);
          return _mm256_madd_epi16(_mm256_maddubs_epi16(a[j], xs_j), ones);
        };
        acc = _mm256_add_epi32(dot(0), _mm256_set1_epi32(back * xb[t * nblk]));  // SIGNED_SHIFTED: the 128 back
        for (int j = 1; j < NU; j++) acc = _mm256_add_epi32(acc, dot(j));
      }
      racc[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(xs[t * nblk]), racc[t][h]);
    }
  }
}

// The blocks of one run (whole 16-column blocks, then its last 8 columns when its length is
// an odd multiple of 8), from its first step st to s1; blk counts the activation blocks.
template <int NT, class U, bool SMALLW>
FASQ_AVX2 FASQ_INLINE void run_blocks(const U& u, const uint8_t* code, int64_t st, int64_t s1, const Acts& A,
                                      int64_t in, int32_t back, int64_t& blk, __m256 (&racc)[NT][2]) {
  constexpr int SPB = 4 / U::UPS;      // steps per 16-column block
  constexpr int64_t XB = 4 * U::UPS;   // activation bytes per step
  for (; st + SPB <= s1; st += SPB, blk++)
    block<NT, 4, U, SMALLW>(u, code + st * 64, A.xq + st * XB, in, A.xs + blk, A.xb + blk, back, A.nblk, racc);
  if (st < s1)
    block<NT, 2, U, SMALLW>(u, code + st * 64, A.xq + st * XB, in, A.xs + blk, A.xb + blk, back, A.nblk, racc), blk++;
}

// Row block rb (16 rows, two halves of 8), tokens [0, NT) of `A`; tot [NT][16] written. Per
// run: the codebook's table (and sign mode) when it changes, the sums started at the run's
// correction (-shift * A.rq), the run's blocks, then its scales (and offsets * the run's
// float sum of x: OFF): per row the AVX-512 kernels' float operations in their order.
template <int NT, class U, bool OFF>
FASQ_AVX2 void row_block(const Run* runs, int64_t R, int64_t M, int64_t S, const Prepared& P, int64_t rb,
                         const Acts& A, float* tot) {
  const int64_t steps = M / U::SUBSPACES, in = steps * 4 * U::UPS;
  const uint8_t* code = P.codes + rb * steps * 64;
  __m256 tv[NT][2];
  for (int t = 0; t < NT; t++) tv[t][0] = tv[t][1] = _mm256_setzero_ps();
  U u;
  int64_t loaded = -1, blk = 0;
  int mode = SMALL;
  for (int64_t r = 0; r < R; r++) {
    const Run run = runs[r];
    if (run.c != loaded) {
      mode = (int)P.sign[run.c], loaded = run.c;
      u.load(P.tabs, run.c, _mm256_set1_epi8(mode == SIGNED_SHIFTED ? (char)0x80 : 0));
    }
    __m256 racc[NT][2];
    for (int t = 0; t < NT; t++) racc[t][0] = racc[t][1] = _mm256_set1_ps(-P.shift[run.c] * A.rq[t * R + r]);
    const int64_t st = run.m0 / U::SUBSPACES, s1 = run.m1 / U::SUBSPACES;
    if (mode == SMALL) run_blocks<NT, U, true>(u, code, st, s1, A, in, 0, blk, racc);
    else run_blocks<NT, U, false>(u, code, st, s1, A, in, mode == SIGNED_SHIFTED ? 128 : 0, blk, racc);
    const float* sc = P.scales + (rb * S + run.g) * 16;
    for (int h = 0; h < 2; h++) {
      const __m256 sv = _mm256_mul_ps(_mm256_loadu_ps(sc + 8 * h), _mm256_set1_ps(P.cbscale[run.c]));
      for (int t = 0; t < NT; t++) tv[t][h] = _mm256_fmadd_ps(racc[t][h], sv, tv[t][h]);
      if (OFF) {
        const __m256 ov = _mm256_loadu_ps(P.offsets + (rb * S + run.g) * 16 + 8 * h);
        for (int t = 0; t < NT; t++) tv[t][h] = _mm256_fmadd_ps(ov, _mm256_set1_ps(A.xsum[t * R + r]), tv[t][h]);
      }
    }
  }
  for (int t = 0; t < NT; t++) _mm256_storeu_ps(tot + t * 16, tv[t][0]), _mm256_storeu_ps(tot + t * 16 + 8, tv[t][1]);
}

template <class U, bool OFF>
BlockFn for_tokens(int nt) {
  switch (nt) {
    case 1: return row_block<1, U, OFF>;
    case 2: return row_block<2, U, OFF>;
    case 3: return row_block<3, U, OFF>;
    default: return row_block<4, U, OFF>;
  }
}

template <class U>
BlockFn for_tokens(bool off, int nt) {
  return off ? for_tokens<U, true>(nt) : for_tokens<U, false>(nt);
}

// 8 values of x (fp32 / fp16 / bf16 by x_dtype) from column j as floats.
FASQ_AVX2 inline __m256 load_x8(const void* x, int dt, int64_t j) {
  if (dt == CB_F32) return _mm256_loadu_ps(static_cast<const float*>(x) + j);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + j));
  if (dt == CB_F16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));  // bf16: the high half
}

// Every lane of the horizontal max / sum of v's 8 lanes.
FASQ_AVX2 inline __m256 hmax8(__m256 v) {
  v = _mm256_max_ps(v, _mm256_permute_ps(v, 0xB1));
  v = _mm256_max_ps(v, _mm256_permute_ps(v, 0x4E));
  return _mm256_max_ps(v, _mm256_permute2f128_ps(v, v, 1));
}
FASQ_AVX2 inline float hsum8(__m256 v) {
  v = _mm256_add_ps(v, _mm256_permute_ps(v, 0xB1));
  v = _mm256_add_ps(v, _mm256_permute_ps(v, 0x4E));
  return _mm256_cvtss_f32(_mm256_add_ps(v, _mm256_permute2f128_ps(v, v, 1)));
}

// quantize_token of pq_cpu_int8_avx512.cpp on AVX2 (QuantizeFn): one block as two halves of 8
// columns (a run's last 8-column block: one), the same arithmetic (127 / max |x| in fp32,
// rounding to nearest even, sums in the same order), so the same bytes, steps and sums: with
// the kernels' per-row order of float operations also the same, both instruction sets give
// the same output bits.
FASQ_AVX2 void quantize_token(const void* x, int dt, const Run* runs, int64_t R, int64_t d, int8_t* xq, float* xs,
                              int32_t* xb, float* rq, float* rf) {
  const __m256i order = d == 2 ? _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7) : _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 sign = _mm256_set1_ps(-0.f);
  int64_t b = 0;
  for (int64_t r = 0; r < R; r++) {
    float cs = 0.f, rs = 0.f;
    for (int64_t c0 = runs[r].m0 * d, c1 = runs[r].m1 * d; c0 < c1; c0 += BCOLS, b++) {
      const int nh = c1 - c0 >= 16 ? 2 : 1;
      __m256 v[2] = {load_x8(x, dt, c0), nh == 2 ? load_x8(x, dt, c0 + 8) : _mm256_setzero_ps()};
      const float amax = _mm256_cvtss_f32(hmax8(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1]))));
      const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      __m256i isum = _mm256_setzero_si256();
      for (int h = 0; h < nh; h++) {
        const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(v[h], inv));
        isum = _mm256_add_epi32(isum, q);
        const __m256i p = _mm256_permutevar8x32_epi32(q, order);
        const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(xq + c0 + 8 * h), _mm_packs_epi16(q16, q16));
      }
      const float step = amax / 127.f;
      xs[b] = step;
      const float is = hsum8(_mm256_cvtepi32_ps(isum));  // the int8 sum: exact in fp32
      xb[b] = (int32_t)is;
      cs += step * is;
      if (rf) rs += hsum8(v[0]) + hsum8(v[1]);  // the AVX-512 reduction's order: the same sum
    }
    rq[r] = cs;
    if (rf) rf[r] = rs;
  }
}

}  // namespace

bool avx2_cpu() { return cpu_has_avx2(); }

BlockFn avx2_pick(Layout lay, bool offsets, int nt) {
  if (lay == BYTES) return for_tokens<ByteUnits>(offsets, nt);
  if (lay == NIBBLES) return for_tokens<NibbleUnits16>(offsets, nt);
  return for_tokens<PairUnits16>(offsets, nt);  // PAIRS, K <= 16 (the caller checks)
}

const QuantizeFn avx2_quantize = quantize_token;

}  // namespace fasq_int8
#else
namespace fasq_int8 {
bool avx2_cpu() { return false; }
BlockFn avx2_pick(Layout, bool, int) { return nullptr; }
const QuantizeFn avx2_quantize = nullptr;
}  // namespace fasq_int8
#endif
