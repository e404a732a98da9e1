// The int8 decode kernels on AVX-512 VBMI + VNNI (every format of the int8 path: d=2 K <= 256,
// d=1 K <= 16 and the 8-bit grid); one instruction set per file. Layouts, tables and the
// arithmetic: pq_cpu_int8.cpp's header comment; the AVX2 kernels: pq_cpu_int8_avx2.cpp.

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pq_cpu_int8.h"

namespace fasq_int8 {
namespace {

using fasq_cpu::CB_F32;  // dtype codes of x and y
using fasq_cpu::CB_F16;

// How d=2 layers with 64 < K <= 256 look their codes up: TWO_SOURCE, vpermi2b on 128-entry
// halves (PairUnits), or QUARTERS, vpermb on 64-entry quarters (QuarterUnits). Same results.
// By default QUARTERS on Intel, where a vpermi2b is three uops (1024 x 2048 d=2 K=256 in
// cache, one thread: 3.18-3.30 ns a 64-byte step against 3.50; from memory on 2 threads the
// same time), and TWO_SOURCE elsewhere (AMD's Zen 4 runs a vpermi2b as one uop).
// FASQ_CPU_INT8_LOOKUP=vpermi2b|vpermb sets it for a process, fasq_cpu_int8_set_lookup for
// later calls.
enum Lookup { TWO_SOURCE = 1, QUARTERS = 2 };
int g_lookup = 0;  // 0: not read yet

int lookup() {
  if (g_lookup == 0) {
    const char* e = getenv("FASQ_CPU_INT8_LOOKUP");
    if (e && strcmp(e, "vpermi2b") == 0) g_lookup = TWO_SOURCE;
    else if (e && strcmp(e, "vpermb") == 0) g_lookup = QUARTERS;
    else {
#if FASQ_X86
      g_lookup = __builtin_cpu_is("intel") ? QUARTERS : TWO_SOURCE;
#else
      g_lookup = TWO_SOURCE;
#endif
    }
  }
  return g_lookup;
}

}  // namespace

int avx512_lookup() { return lookup(); }

int avx512_set_lookup(int how) {
  const int old = lookup();
  g_lookup = how == TWO_SOURCE || how == QUARTERS ? how : 0;
  return old;
}

}  // namespace fasq_int8

#if FASQ_X86
#define FASQ_I8 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni,avx2,fma")))
#define FASQ_INLINE inline __attribute__((always_inline))

namespace fasq_int8 {
namespace {

// 64-byte code steps prefetched ahead (PFD, a template argument: passed at run time it made
// the 8-token kernels twice as slow), by measurement at 4096x4096 d=2 K=256, codes from
// memory: on an Intel Xeon, one thread, 16 / 32 / 64 steps gave 921 / 858 / 912 us; on an
// AMD EPYC (Zen 4), 2 threads, 32 / 64 / 128 gave 160 / 149 / 149 us at 1 token (14336x4096:
// 523 / 493 / 493; 16 tokens 577 / 563 us; the hint, T0, T1 or NTA, made no difference). So
// 32 steps (2 KiB) on Intel, 64 elsewhere.
constexpr int PFD_INTEL = 32, PFD_OTHER = 64;
bool prefetch_near() {
  static const bool intel = __builtin_cpu_is("intel");
  return intel;
}

bool cpu_has_int8() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi") &&
                          __builtin_cpu_supports("avx512vnni");
  return has;
}

// The end of run r for the 16 rows of block rb: tv[t] += racc[t] * (rows' scales * the
// codebook's step) + the rows' offsets * the run's float sum of x (OFF).
template <int NT, bool OFF>
FASQ_I8 inline void end_run(const Prepared& P, const Acts& A, int64_t rb, int64_t S, const Run& run, int64_t r,
                            const __m512* racc, __m512* tv) {
  const __m512 sv = _mm512_mul_ps(_mm512_loadu_ps(P.scales + (rb * S + run.g) * 16), _mm512_set1_ps(P.cbscale[run.c]));
  for (int t = 0; t < NT; t++) tv[t] = _mm512_fmadd_ps(racc[t], sv, tv[t]);
  if (OFF) {
    const __m512 ov = _mm512_loadu_ps(P.offsets + (rb * S + run.g) * 16);
    for (int t = 0; t < NT; t++) tv[t] = _mm512_fmadd_ps(ov, _mm512_set1_ps(A.xsum[t * A.R + r]), tv[t]);
  }
}

// A "unit" is one register of weights, 16 rows x 4 columns as unsigned int8 (+ the table's
// shift), dotted with 4 activation bytes by one vpdpbusd; a 16-column activation block is 4
// units. The families below turn one 64-byte step of codes into UPS units.

// d=2 (PAIRS): a step holds 4 subspaces of 16 rows; unit 0 their first values (even
// columns), unit 1 their second ones. KW: the tables' width, 64 (K <= 64: one vpermb per
// table), 128 (one vpermi2b) or 256 (two vpermi2b and a blend on the code's top bit). On
// this Intel core a vpermi2b takes 2 cycles of its shuffle port and a vpermb 1
// (benchmarks/csrc/probe_permute.cpp).
template <int KW>
struct PairUnits {
  static constexpr int UPS = 2, SUBSPACES = 4;
  __m512i ta0, ta1, ta2, ta3, tb0, tb1, tb2, tb3;
  FASQ_I8 FASQ_INLINE void load(const uint8_t* tabs, int64_t c) {  // tabs [C][2][256]
    const __m512i* tp = reinterpret_cast<const __m512i*>(tabs + c * 512);
    ta0 = _mm512_loadu_si512(tp), tb0 = _mm512_loadu_si512(tp + 4);
    if (KW > 64) ta1 = _mm512_loadu_si512(tp + 1), tb1 = _mm512_loadu_si512(tp + 5);
    if (KW > 128) {
      ta2 = _mm512_loadu_si512(tp + 2), ta3 = _mm512_loadu_si512(tp + 3);
      tb2 = _mm512_loadu_si512(tp + 6), tb3 = _mm512_loadu_si512(tp + 7);
    }
  }
  FASQ_I8 FASQ_INLINE void units(__m512i idx, __m512i* w) const {
    if (KW == 64) {
      w[0] = _mm512_permutexvar_epi8(idx, ta0), w[1] = _mm512_permutexvar_epi8(idx, tb0);
      return;
    }
    w[0] = _mm512_permutex2var_epi8(ta0, idx, ta1), w[1] = _mm512_permutex2var_epi8(tb0, idx, tb1);
    if (KW > 128) {
      const __mmask64 hi = _mm512_movepi8_mask(idx);
      w[0] = _mm512_mask_blend_epi8(hi, w[0], _mm512_permutex2var_epi8(ta2, idx, ta3));
      w[1] = _mm512_mask_blend_epi8(hi, w[1], _mm512_permutex2var_epi8(tb2, idx, tb3));
    }
  }
};

// The same units for 64 < K <= 256 from the tables in 64-entry quarters: per value one vpermb
// per quarter, merged under the code's bit 6 (masked vpermb) and bit 7 (a blend). On this
// Intel core a vpermi2b is three uops, two of them on the shuffle port, and each needs a copy
// of its destroyed operand, so the 256-entry lookup of PairUnits<256> costs about 19 uops a
// step against 13 here (both 8 shuffle-port cycles). Which of the two a call takes: lookup().
template <int KW>
struct QuarterUnits {
  static constexpr int UPS = 2, SUBSPACES = 4, Q = KW / 64;
  __m512i ta[Q], tb[Q];
  FASQ_I8 FASQ_INLINE void load(const uint8_t* tabs, int64_t c) {  // tabs [C][2][256]
    const __m512i* tp = reinterpret_cast<const __m512i*>(tabs + c * 512);
    for (int q = 0; q < Q; q++) ta[q] = _mm512_loadu_si512(tp + q), tb[q] = _mm512_loadu_si512(tp + 4 + q);
  }
  FASQ_I8 FASQ_INLINE static __m512i look(const __m512i* t, __m512i idx, __mmask64 b6, __mmask64 b7) {
    const __m512i lo = _mm512_mask_permutexvar_epi8(_mm512_permutexvar_epi8(idx, t[0]), b6, idx, t[1]);
    if (KW <= 128) return lo;
    const __m512i hi = _mm512_mask_permutexvar_epi8(_mm512_permutexvar_epi8(idx, t[2]), b6, idx, t[3]);
    return _mm512_mask_blend_epi8(b7, lo, hi);
  }
  FASQ_I8 FASQ_INLINE void units(__m512i idx, __m512i* w) const {
    const __mmask64 b6 = _mm512_movepi8_mask(_mm512_add_epi8(idx, idx));
    const __mmask64 b7 = KW > 128 ? _mm512_movepi8_mask(idx) : 0;
    w[0] = look(ta, idx, b6, b7), w[1] = look(tb, idx, b6, b7);
  }
};

// d=1, K <= 16 (NIBBLES): a step holds 8 columns of 16 rows, two codes a byte; unit 0 the low
// halves (columns 0-3), unit 1 the high ones (4-7), each looked up by one vpermb in a table
// repeated 4 times (index bits 4-5 ignored, so neither half needs masking).
struct NibbleUnits {
  static constexpr int UPS = 2, SUBSPACES = 8;
  __m512i tab;
  FASQ_I8 FASQ_INLINE void load(const uint8_t* tabs, int64_t c) { tab = _mm512_loadu_si512(tabs + c * 64); }
  FASQ_I8 FASQ_INLINE void units(__m512i idx, __m512i* w) const {
    w[0] = _mm512_permutexvar_epi8(idx, tab), w[1] = _mm512_permutexvar_epi8(_mm512_srli_epi16(idx, 4), tab);
  }
};

// d=1, the 8-bit grid (BYTES): a step holds 4 columns of 16 rows; the codes are the unsigned
// values, so the step is its own unit.
struct ByteUnits {
  static constexpr int UPS = 1, SUBSPACES = 4;
  FASQ_I8 FASQ_INLINE void load(const uint8_t*, int64_t) {}
  FASQ_I8 FASQ_INLINE void units(__m512i idx, __m512i* w) const { w[0] = idx; }
};

// One activation block: NU units (4: 16 columns; 2: a run's last 8) from the steps at `code`,
// then per token racc[t] += float(its int32 dot product) * the block's step. `xq` points at
// the block's first activation byte of token 0 (tokens `in` bytes apart).
template <int NT, int NU, int PFD, class U>
FASQ_I8 FASQ_INLINE void block(const U& u, const __m512i* code, const int8_t* xq, int64_t in, const float* xs,
                               int64_t nblk, __m512* racc) {
  __m512i w[NU];
  for (int s = 0; s < NU / U::UPS; s++) {
    _mm_prefetch(reinterpret_cast<const char*>(code + s + PFD), _MM_HINT_T0);
    u.units(_mm512_loadu_si512(code + s), w + s * U::UPS);
  }
  for (int t = 0; t < NT; t++) {
    const int32_t* xp = reinterpret_cast<const int32_t*>(xq + t * in);
    __m512i acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], _mm512_set1_epi32(xp[0]));
    for (int j = 1; j < NU; j++) acc = _mm512_dpbusd_epi32(acc, w[j], _mm512_set1_epi32(xp[j]));
    racc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(xs[t * nblk]), racc[t]);
  }
}

// Row block rb (16 rows), tokens [0, NT) of `A` (already offset to the first token); tot
// [NT][16] written. U: the code family (above); OFF: offsets present. Per run: the
// codebook's tables loaded when it changes, the float sums started at the run's correction
// (-shift * A.rq: the tables' shift and centre removed once per run), whole 16-column blocks,
// then the run's last 8 columns when its length is an odd multiple of 8, then end_run.
template <int NT, class U, bool OFF, int PFD>
FASQ_I8 void row_block(const Run* runs, int64_t R, int64_t M, int64_t S, const Prepared& P, int64_t rb,
                       const Acts& A, float* tot) {
  constexpr int SPB = 4 / U::UPS;  // steps per 16-column block
  constexpr int64_t XB = 4 * U::UPS;  // activation bytes per step
  const int64_t steps = M / U::SUBSPACES, in = steps * XB;
  const __m512i* code = reinterpret_cast<const __m512i*>(P.codes) + rb * steps;
  __m512 tv[NT];
  for (int t = 0; t < NT; t++) tv[t] = _mm512_setzero_ps();
  U u;
  int64_t loaded = -1, blk = 0;
  for (int64_t r = 0; r < R; r++) {
    const Run run = runs[r];
    if (run.c != loaded) u.load(P.tabs, run.c), loaded = run.c;
    __m512 racc[NT];
    for (int t = 0; t < NT; t++) racc[t] = _mm512_set1_ps(-P.shift[run.c] * A.rq[t * R + r]);
    const int64_t s1 = run.m1 / U::SUBSPACES;
    int64_t st = run.m0 / U::SUBSPACES;
    for (; st + SPB <= s1; st += SPB, blk++) block<NT, 4, PFD>(u, code + st, A.xq + st * XB, in, A.xs + blk, A.nblk, racc);
    if (st < s1) block<NT, 2, PFD>(u, code + st, A.xq + st * XB, in, A.xs + blk, A.nblk, racc), blk++;
    end_run<NT, OFF>(P, A, rb, S, run, r, racc, tv);
  }
  for (int t = 0; t < NT; t++) _mm512_storeu_ps(tot + t * 16, tv[t]);
}

// The kernel of family U for nt tokens (1..8; NT is a template argument so that each
// token's sums stay in registers).
template <class U, bool OFF, int PFD>
BlockFn for_tokens(int nt) {
  switch (nt) {
    case 1: return row_block<1, U, OFF, PFD>;
    case 2: return row_block<2, U, OFF, PFD>;
    case 3: return row_block<3, U, OFF, PFD>;
    case 4: return row_block<4, U, OFF, PFD>;
    case 5: return row_block<5, U, OFF, PFD>;
    case 6: return row_block<6, U, OFF, PFD>;
    case 7: return row_block<7, U, OFF, PFD>;
    default: return row_block<8, U, OFF, PFD>;
  }
}

template <class U>
BlockFn for_tokens(bool off, int nt) {
  if (prefetch_near()) return off ? for_tokens<U, true, PFD_INTEL>(nt) : for_tokens<U, false, PFD_INTEL>(nt);
  return off ? for_tokens<U, true, PFD_OTHER>(nt) : for_tokens<U, false, PFD_OTHER>(nt);
}

// 16 values of x (fp32 / fp16 / bf16 by x_dtype) from column j as floats; lanes outside
// `m` read nothing and are 0.
FASQ_I8 inline __m512 load_x(const void* x, int dt, int64_t j, __mmask16 m) {
  if (dt == CB_F32) return _mm512_maskz_loadu_ps(m, static_cast<const float*>(x) + j);
  const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(x) + j);
  if (dt == CB_F16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));  // bf16: the high half
}

// Lane 0 of a horizontal reduction of v by `op` over 16 lanes: swap neighbours, pairs,
// 128-bit quarters, 256-bit halves (every lane ends with the result).
template <class Op>
FASQ_I8 FASQ_INLINE __m512 reduce16(__m512 v, Op op) {
  v = op(v, _mm512_permute_ps(v, 0xB1));
  v = op(v, _mm512_permute_ps(v, 0x4E));
  v = op(v, _mm512_shuffle_f32x4(v, v, 0xB1));
  return op(v, _mm512_shuffle_f32x4(v, v, 0x4E));
}

// One token's activations x[in] quantized per block of 16 columns inside each run (a run's
// last block 8 columns when its length is an odd multiple of 8), blocks numbered in run
// order: xq[in] int8 (d=2: each 8 columns' even columns, then their odd ones), xs[b] = the
// block's max |x| / 127, xb[b] its int8 sum; per run, rq[r] = the sum over its blocks of xs[b] * the block's
// int8 sum and rf[r] = its float sum of x (only with offsets: rf NULL skips it). One block per
// register; values rounded to nearest even, as lrint.
FASQ_I8 void quantize_token(const void* x, int dt, const Run* runs, int64_t R, int64_t d, int8_t* xq, float* xs,
                            int32_t* xb, float* rq, float* rf) {
  const __m512i order = d == 2 ? _mm512_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15)
                               : _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 k127 = _mm512_set1_ps(127.f);
  auto vmax = [](__m512 a, __m512 b) FASQ_I8 { return _mm512_max_ps(a, b); };
  auto vadd = [](__m512 a, __m512 b) FASQ_I8 { return _mm512_add_ps(a, b); };
  int64_t b = 0;
  for (int64_t r = 0; r < R; r++) {
    float cs = 0.f, rs = 0.f;
    for (int64_t c0 = runs[r].m0 * d, c1 = runs[r].m1 * d; c0 < c1; c0 += BCOLS, b++) {
      const __mmask16 m = c1 - c0 >= 16 ? 0xFFFF : 0x00FF;
      const __m512 v = load_x(x, dt, c0, m);
      const __m512 amax = reduce16(_mm512_abs_ps(v), vmax);
      const __m512 inv = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(amax, _mm512_setzero_ps(), _CMP_GT_OQ), k127, amax);
      const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v, inv));
      _mm_mask_storeu_epi8(xq + c0, m, _mm512_cvtepi32_epi8(_mm512_permutexvar_epi32(order, q)));
      const float step = _mm512_cvtss_f32(amax) / 127.f;
      xs[b] = step;
      const float isum = _mm512_cvtss_f32(reduce16(_mm512_cvtepi32_ps(q), vadd));  // the int8 sum: exact in fp32
      xb[b] = (int32_t)isum;
      cs += step * isum;
      if (rf) rs += _mm512_cvtss_f32(reduce16(v, vadd));
    }
    rq[r] = cs;
    if (rf) rf[r] = rs;
  }
}

BlockFn pick(Layout lay, int64_t K, bool off, int nt) {
  if (lay == BYTES) return for_tokens<ByteUnits>(off, nt);
  if (lay == NIBBLES) return for_tokens<NibbleUnits>(off, nt);
  if (K <= 64) return for_tokens<PairUnits<64>>(off, nt);
  if (lookup() == QUARTERS)
    return K > 128 ? for_tokens<QuarterUnits<256>>(off, nt) : for_tokens<QuarterUnits<128>>(off, nt);
  return K > 128 ? for_tokens<PairUnits<256>>(off, nt) : for_tokens<PairUnits<128>>(off, nt);
}

}  // namespace

bool avx512_cpu() { return cpu_has_int8(); }
BlockFn avx512_pick(Layout lay, int64_t K, bool offsets, int nt) { return pick(lay, K, offsets, nt); }
const QuantizeFn avx512_quantize = quantize_token;

}  // namespace fasq_int8
#else
namespace fasq_int8 {
bool avx512_cpu() { return false; }
BlockFn avx512_pick(Layout, int64_t, bool, int) { return nullptr; }
const QuantizeFn avx512_quantize = nullptr;
}  // namespace fasq_int8
#endif
