// fasq CPU decode through int8 lookups and integer dot products (AVX-512 VBMI + VNNI).
// The Python side is fasq/kernels/cpu.py (kernel "cpu_int8"); the exact float kernels are
// in pq_cpu.cpp. Why: the float kernel needs one table access per code (about a code per
// cycle); here 64 codes are looked up per instruction, so decode runs near memory speed.
//
// Formats: one-byte codes with d=2, K <= 256 (the default d=2 K=256, and d=2 K=64), or
// d=1, K <= 16 (d=1 K=16, and RTN at 1-4 bits: a grid codebook 0..K-1 with a scale and a
// minimum per group), or RTN at 8 bits (d=1, the grid 0..255); codebook runs and scale
// groups a multiple of 8 columns. Anything else: the caller keeps the float path
// (fasq_cpu_int8_sizes says so).
//
// Load time (fasq_cpu_int8_prepare, once per layer; the checkpoint is unchanged):
//   codes   uint8 [OB][M/4][16][4]   OB = ceil(out/16) row blocks; a 64-byte step holds 4
//                                    consecutive codes of each of 16 rows (one 32-bit lane
//                                    per row), padding rows code 0
//   tabs    uint8 [C][2][256]        first / second value of each centroid as int8 + shift
//                                    (vpdpbusd multiplies unsigned by signed bytes)
//   cbscale float [2][C]             [0] the codebook's int8 step: max |value| / 127, or 1
//                                    when every value is an integer in [-127, 127] (RTN's
//                                    grid: then the copy is exact); [1] its shift: the bytes
//                                    added to its table (0 when those integers are >= 0,
//                                    else 128) + the grid's centre (RTN, see prepare)
//   scales  float [OB][S][16]        row scales (1 without scales), 16 rows per vector
//   offsets float [OB][S][16]        or nothing (RTN: + centre * scale)
// Per call: activations quantized to int8 per block of 16 columns inside each run (BCOLS; a
// run's last block 8 columns when its length is an odd multiple of 8) with a float step per
// block. Per 64-byte step of codes two 256-entry lookups (two vpermi2b on 128-byte halves,
// blended on the code's top bit; K <= 128: one vpermi2b; K <= 64: one vpermb, half a
// vpermi2b's cost on Intel; on Intel by default vpermb on 64-byte quarters instead: lookup())
// give two registers of 16 rows x 4 columns ("units"); per block (4
// units) and token four vpdpbusd against broadcast groups of 4 activations, one int->float
// and one FMA. The tables' shift is removed once per run and token: its float sums start at
// -shift * (sum over its blocks of step * the block's int8 sum). Per run one FMA with the 16
// rows' scales. Up to 8 tokens share each lookup; more tokens go 8 at a time over the same
// row block (its codes still in L1/L2). Codes are prefetched PFD steps ahead: one thread's
// hardware prefetch alone left the d=2 K=256 kernel at 44 % of the copy bandwidth
// (4096x4096, codes from memory: 1400 us against 616 us; with the prefetch about 860 us).
//
// d=1, K <= 16 (the "nibble" layout; everything else as above):
//   codes   uint8 [OB][in/8][16][4]  per 64-byte step 8 columns of 16 rows, two codes a byte:
//                                    byte j of row r's lane holds column 8s+j in its low
//                                    and column 8s+4+j in its high half
//   tabs    uint8 [C][64]            each codebook's 16 values as int8 + shift, repeated 4
//                                    times (a 64-entry vpermb table that ignores index
//                                    bits 4-5, so neither half needs masking)
// per step one load, one shift, two vpermb (low halves, then high ones): two units, against
// the step's 8 activations in column order.
//
// d=1, K=256 with every codebook the grid 0..255 (RTN at 8 bits: the "bytes" layout):
//   codes   uint8 [OB][in/4][16][4]  as d=2's, one column a byte; no tables (the codes are
//                                    the unsigned values: step 1, shift the centre 127.5)
// each step is one unit as it is loaded.

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "pq_cpu.h"
#include "pq_cpu_kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

// Columns per activation block. Each block costs one int->float and one FMA per token and 16
// rows, so its width sets the multi-token cost; its rounding sets the accuracy. Default model,
// WikiText-2 10 x 2048 through this kernel (exact path 22.098): 8 columns 22.129 (+0.14 %),
// 16 columns 22.133 (+0.16 %); 16 columns take 6-15 % less time at 8-16 tokens (1024 x 1024
// in cache) and the same at 1. 32 columns (llama.cpp's Q8_0) moved an earlier default by
// +0.71 % against +0.375 % at 8.
constexpr int64_t BCOLS = 16;
constexpr int NT_MAX = 8;      // tokens per pass over a row block

using LayerArgs = FasqLayerArgs;  // pq_cpu.h

using fasq_cpu::elem;   // pq_cpu_kernels.h: a value of fp32 / fp16 / bf16 storage, by run-time dtype
using fasq_cpu::store;
using fasq_cpu::CB_F32;  // dtype codes of x and y (and of stored tensors)
using fasq_cpu::CB_F16;
using fasq_cpu::CB_BF16;

struct Run {  // subspaces [m0, m1), codebook c, scale group g
  int64_t m0, m1, c, g;
};

// How a layer's codes are laid out and looked up (header comment).
enum Layout { PAIRS, NIBBLES, BYTES };

// BYTES: d=1 and every codebook the 8-bit grid 0..255 (RTN at 8 bits), so a code is its
// own value: no lookup at all.
bool byte_grid(const LayerArgs& a) {
  if (a.d != 1 || a.K != 256) return false;
  for (int64_t c = 0; c < a.C; c++)
    for (int64_t k = 0; k < 256; k++)
      if (elem(a.codebooks, c * 256 + k, (int)a.cb_dtype) != (float)k) return false;
  return true;
}

inline Layout layout(const LayerArgs& a) { return a.d == 2 ? PAIRS : a.K <= 16 ? NIBBLES : BYTES; }

// 0 when the int8 path takes this layer, else why not (1 format, 2 alignment). `grid`: also
// scan a d=1 K=256 layer's codebooks for the 8-bit grid (prepare does; a call trusts the
// layer it prepared, whose codebooks the caller keeps unchanged).
int supported(const LayerArgs& a, bool grid = true) {
  const bool fmt = (a.d == 2 && a.K <= 256) || (a.d == 1 && a.K <= 16) || (a.d == 1 && a.K == 256 && (!grid || byte_grid(a)));
  if (!fmt || a.code_bytes != 1 || a.K < 1 || a.in <= 0 || a.out <= 0 || a.in % a.d) return 1;
  const int64_t M = a.in / a.d, per = 8 / a.d;  // subspaces per 8 columns
  if (a.C <= 0 || M % a.C || (a.scales && (a.S <= 0 || M % a.S)) || (a.offsets && !a.scales)) return 1;
  if (M % per || (M / a.C) % per || (a.scales && (M / a.S) % per)) return 2;
  return 0;
}

std::vector<Run> make_runs(const LayerArgs& a) {
  const int64_t M = a.in / a.d, span = M / a.C, gsub = a.scales ? M / a.S : M;
  std::vector<Run> runs;
  for (int64_t m = 0; m < M;) {
    const int64_t c = m / span, g = m / gsub, end = std::min((c + 1) * span, (g + 1) * gsub);
    runs.push_back({m, end, c, g});
    m = end;
  }
  return runs;
}

inline int64_t n_groups(const LayerArgs& a) { return a.scales ? a.S : 1; }

// One call's quantized activations. Blocks: each run cut into 8-column pieces, numbered
// in run order (the kernel walks them in the same order).
struct Acts {
  const int8_t* xq;    // [T][in/8][8]
  const float* xs;     // [T][nblk] float step of each block
  const float* xsum;   // [T][R] float sums of x over each run (offsets), or NULL
  const float* rq;     // [T][R] sum over the run's blocks of step * int8 sum
  int64_t nblk, R;
};

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
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
      g_lookup = __builtin_cpu_is("intel") ? QUARTERS : TWO_SOURCE;
#else
      g_lookup = TWO_SOURCE;
#endif
    }
  }
  return g_lookup;
}

struct Prepared {
  const uint8_t* codes;
  const uint8_t* tabs;
  const float* cbscale;
  const float* shift;  // cbscale + C: each codebook's table shift
  const float* scales;
  const float* offsets;
};

}  // namespace

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FASQ_I8 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni,avx2,fma")))
#define FASQ_INLINE inline __attribute__((always_inline))

// 64-byte code steps prefetched ahead (2 KiB): 16 / 32 / 64 gave 921 / 858 / 912 us at
// 4096x4096 d=2 K=256, one thread, codes from memory.
#ifndef FASQ_PFD
#define FASQ_PFD 32
#endif
namespace {

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
template <int NT, int NU, class U>
FASQ_I8 FASQ_INLINE void block(const U& u, const __m512i* code, const int8_t* xq, int64_t in, const float* xs,
                               int64_t nblk, __m512* racc) {
  __m512i w[NU];
  for (int s = 0; s < NU / U::UPS; s++) {
    _mm_prefetch(reinterpret_cast<const char*>(code + s + FASQ_PFD), _MM_HINT_T0);
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
template <int NT, class U, bool OFF>
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
    for (; st + SPB <= s1; st += SPB, blk++) block<NT, 4>(u, code + st, A.xq + st * XB, in, A.xs + blk, A.nblk, racc);
    if (st < s1) block<NT, 2>(u, code + st, A.xq + st * XB, in, A.xs + blk, A.nblk, racc), blk++;
    end_run<NT, OFF>(P, A, rb, S, run, r, racc, tv);
  }
  for (int t = 0; t < NT; t++) _mm512_storeu_ps(tot + t * 16, tv[t]);
}

typedef void (*BlockFn)(const Run*, int64_t, int64_t, int64_t, const Prepared&, int64_t, const Acts&, float*);

// The kernel of family U for nt tokens (1..8; NT is a template argument so that each
// token's sums stay in registers).
template <class U, bool OFF>
BlockFn for_tokens(int nt) {
  switch (nt) {
    case 1: return row_block<1, U, OFF>;
    case 2: return row_block<2, U, OFF>;
    case 3: return row_block<3, U, OFF>;
    case 4: return row_block<4, U, OFF>;
    case 5: return row_block<5, U, OFF>;
    case 6: return row_block<6, U, OFF>;
    case 7: return row_block<7, U, OFF>;
    default: return row_block<8, U, OFF>;
  }
}

template <class U>
BlockFn for_tokens(bool off, int nt) {
  return off ? for_tokens<U, true>(nt) : for_tokens<U, false>(nt);
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
// block's max |x| / 127; per run, rq[r] = the sum over its blocks of xs[b] * the block's
// int8 sum and rf[r] = its float sum of x (only with offsets: rf NULL skips it). One block per
// register; values rounded to nearest even, as lrint.
FASQ_I8 void quantize_token(const void* x, int dt, const Run* runs, int64_t R, int64_t d, int8_t* xq, float* xs,
                            float* rq, float* rf) {
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
      cs += step * _mm512_cvtss_f32(reduce16(_mm512_cvtepi32_ps(q), vadd));  // the int8 sum: exact in fp32
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
#else
namespace {
bool cpu_has_int8() { return false; }
}  // namespace
#endif

extern "C" {

// 1 when this CPU has the int8 path (AVX-512 F/BW/VL + VBMI + VNNI) and the instruction-set
// cap (FASQ_CPU_ISA, fasq_cpu_set_isa) allows AVX-512, else 0.
int fasq_cpu_int8_available(void) { return cpu_has_int8() && fasq_cpu_isa_level() >= 2 ? 1 : 0; }

// How d=2 layers with 64 < K <= 256 look their codes up now: 1 vpermi2b, 2 vpermb.
int fasq_cpu_int8_lookup(void) { return lookup(); }

// Set how d=2 layers with 64 < K <= 256 look their codes up from later calls on (1 vpermi2b,
// 2 vpermb; 0 the default for this CPU); returns the previous setting (1 or 2).
int fasq_cpu_int8_set_lookup(int how) {
  const int old = lookup();
  g_lookup = how == TWO_SOURCE || how == QUARTERS ? how : 0;
  return old;
}

// Sizes of a layer's prepared buffers: sizes[0] code bytes, [1] table bytes, [2] codebook
// steps (floats), [3] scale floats, [4] offset floats (0 without offsets). Returns 0, or
// nonzero when the int8 path does not take this format (1) or its alignment (2).
int fasq_cpu_int8_sizes(const LayerArgs* a, int64_t* sizes) {
  if (int err = supported(*a)) return err;
  const int64_t OB = (a->out + 15) / 16, G = n_groups(*a);
  const Layout lay = layout(*a);
  sizes[0] = OB * 16 * (lay == BYTES ? a->in : a->in / 2);  // PAIRS and NIBBLES: a byte per 2 columns
  sizes[1] = a->C * (lay == PAIRS ? 512 : lay == NIBBLES ? 64 : 0);
  sizes[2] = 2 * a->C;
  sizes[3] = OB * G * 16;
  sizes[4] = a->offsets ? OB * G * 16 : 0;
  return 0;
}

// Fill the prepared buffers (sizes from fasq_cpu_int8_sizes) from the layer's tensors.
int fasq_cpu_int8_prepare(const LayerArgs* a, uint8_t* codes, uint8_t* tabs, float* cbscale, float* scales,
                          float* offsets) {
  if (int err = supported(*a)) return err;
  const int64_t OB = (a->out + 15) / 16, G = n_groups(*a), K = a->K, d = a->d, M = a->in / d;
  const Layout lay = layout(*a);
  const bool nib = lay == NIBBLES;
  const int64_t steps = nib ? a->in / 8 : M / 4;  // 64-byte steps per row block
  const uint8_t* src = static_cast<const uint8_t*>(a->codes);
  for (int64_t rb = 0; rb < OB; rb++)
    for (int64_t s = 0; s < steps; s++)
      for (int64_t r = 0; r < 16; r++) {
        const int64_t o = rb * 16 + r;
        uint8_t* dst = codes + ((rb * steps + s) * 16 + r) * 4;
        if (o >= a->out) memset(dst, 0, 4);
        else if (!nib) memcpy(dst, src + o * M + s * 4, 4);
        else
          for (int j = 0; j < 4; j++) dst[j] = (uint8_t)((src[o * M + s * 8 + j] & 15) | (src[o * M + s * 8 + 4 + j] << 4));
      }
  // Per codebook: its int8 step (1 when its values are integers in [-127, 127], as RTN's grid:
  // then the copy is exact), the bytes added to its table (0 when those integers are >= 0:
  // already unsigned; else 128) and one centre z for all codebooks: with offsets and
  // non-negative integer grids of one midpoint (RTN), z = that midpoint, removed from the
  // dot products with the shift (cbscale[1] = bytes added + z) and added back through the
  // offsets (o + z * scale, times the exact sum of x). Why: activation rounding errs by
  // scale * sum_j (q_j - z) * dx_j, and grids of 0..15 centred at 7.5 err less than at 0:
  // RTN 4-bit g64, default model, WikiText-2 through this kernel 28.355 uncentred against
  // 28.020 exact.
  const int64_t C = a->C, tab_bytes = nib ? 64 : 512;
  std::vector<float> step(C, 1.f), added(C, 0.f), mid(C, 0.f);
  bool centre = a->offsets != nullptr;
  for (int64_t c = 0; c < C; c++) {
    float amax = 0.f, vmin = INFINITY, vmax = -INFINITY;
    bool integral = true;
    for (int64_t j = 0; j < K * d; j++) {
      const float v = elem(a->codebooks, c * K * d + j, (int)a->cb_dtype);
      amax = std::max(amax, std::fabs(v)), vmin = std::min(vmin, v), vmax = std::max(vmax, v);
      integral = integral && v == std::nearbyint(v) && (lay == BYTES || std::fabs(v) <= 127.f);
    }
    step[c] = integral ? 1.f : amax > 0.f ? amax / 127.f : 1.f;
    added[c] = integral && vmin >= 0.f ? 0.f : 128.f;
    mid[c] = (vmin + vmax) / 2;
    centre = centre && integral && vmin >= 0.f && mid[c] == mid[0];
  }
  const float z = centre ? mid[0] : 0.f;
  for (int64_t c = 0; c < C; c++) {
    cbscale[c] = step[c], cbscale[C + c] = added[c] + z;
    if (lay == BYTES) continue;  // the codes are the values: no tables
    for (int64_t i = 0; i < tab_bytes; i++) {
      // d=2: [2][256] by value e, centroid k; d=1: [64], centroid i % 16
      const int64_t k = nib ? i % 16 : i % 256, e = nib ? 0 : i / 256;
      const float v = k < K ? elem(a->codebooks, (c * K + k) * d + e, (int)a->cb_dtype) : 0.f;
      const long q = std::lrint(v / step[c]);  // |q| <= 127
      tabs[c * tab_bytes + i] = (uint8_t)(std::max(-127L, std::min(127L, q)) + (long)added[c]);
    }
  }
  for (int64_t rb = 0; rb < OB; rb++)
    for (int64_t g = 0; g < G; g++)
      for (int64_t r = 0; r < 16; r++) {
        const int64_t o = rb * 16 + r, j = (rb * G + g) * 16 + r;
        const bool real = o < a->out;
        scales[j] = !real ? 0.f : a->scales ? elem(a->scales, o * a->S + g, (int)a->scale_dtype) : 1.f;
        if (a->offsets) offsets[j] = real ? elem(a->offsets, o * a->S + g, (int)a->scale_dtype) + z * scales[j] : 0.f;
      }
  return 0;
}

// A prepared layer: its arguments and the buffers fasq_cpu_int8_prepare filled (offsets
// NULL without offsets). Every field 8 bytes.
struct Int8Layer {
  const LayerArgs* args;
  const uint8_t* codes;
  const uint8_t* tabs;
  const float* cbscale;
  const float* scales;
  const float* offsets;
};

}  // extern "C"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
namespace {

// One prepared layer's share of a call: its runs, its first output column and its quantized
// activations (quantize_token), or those of an earlier part with the same runs (src): parts
// of a merged layer usually cut x alike, and then x is quantized once for them.
struct PartCall {
  const Int8Layer* p;
  const PartCall* src = this;  // whose xq, xs, xsum, rq this part reads
  std::vector<Run> runs;
  std::vector<int8_t> xq;
  std::vector<float> xs, xsum, rq;
  int64_t nblk = 0, OB = 0, col0 = 0;

  // Shares x's quantization with `other` when both cut it into the same runs (the blocks and
  // sums depend only on the runs' columns) and both need (or skip) the float sums.
  bool same_cut(const PartCall& other) const {
    if (runs.size() != other.runs.size() || p->args->d != other.p->args->d ||
        (p->offsets == nullptr) != (other.p->offsets == nullptr))
      return false;
    for (size_t r = 0; r < runs.size(); r++)
      if (runs[r].m0 != other.runs[r].m0 || runs[r].m1 != other.runs[r].m1) return false;
    return true;
  }

  // Runs, row blocks, then x's quantization taken from the first of `before` that cuts x
  // alike, else buffers of its own (filled by quantize).
  void setup(const Int8Layer* layer, int64_t T, int64_t first_col, const PartCall* before, int nbefore) {
    p = layer, col0 = first_col;
    const LayerArgs* a = p->args;
    runs = make_runs(*a);
    OB = (a->out + 15) / 16;
    for (const Run& r : runs) nblk += ((r.m1 - r.m0) * a->d + BCOLS - 1) / BCOLS;  // runs are whole 8 columns
    for (int i = 0; i < nbefore && src == this; i++)
      if (before[i].src == &before[i] && same_cut(before[i])) src = &before[i];
    if (src != this) return;
    const int64_t R = runs.size();
    xq.resize(T * a->in), xs.resize(T * nblk), rq.resize(T * R);
    if (p->offsets) xsum.resize(T * R);
  }

  // Token t of x into this part's own buffers.
  void quantize(const void* x, int x_dtype, int64_t t) {
    const LayerArgs* a = p->args;
    const int64_t R = runs.size();
    quantize_token(static_cast<const char*>(x) + t * a->in * fasq_cpu::elem_bytes(x_dtype), x_dtype, runs.data(), R,
                   a->d, xq.data() + t * a->in, xs.data() + t * nblk, rq.data() + t * R,
                   p->offsets ? xsum.data() + t * R : nullptr);
  }

  // Row block rb, all T tokens (NT_MAX at a time): y[t, col0 + row] (+ bias), rows ldy apart.
  void row_block(int64_t rb, int64_t T, void* y, int64_t ldy, int x_dtype, float* tot) const {
    const LayerArgs* a = p->args;
    const int64_t R = runs.size(), M = a->in / a->d;
    const bool off = p->offsets != nullptr;
    const Prepared P{p->codes, p->tabs, p->cbscale, p->cbscale + a->C, p->scales, p->offsets};
    const int64_t rows = std::min<int64_t>(16, a->out - rb * 16);
    for (int64_t t0 = 0; t0 < T; t0 += NT_MAX) {
      const int nt = (int)std::min<int64_t>(NT_MAX, T - t0);
      const Acts at{src->xq.data() + t0 * a->in, src->xs.data() + t0 * nblk,
                    off ? src->xsum.data() + t0 * R : nullptr, src->rq.data() + t0 * R, nblk, R};
      pick(layout(*a), a->K, off, nt)(runs.data(), R, M, n_groups(*a), P, rb, at, tot);
      for (int t = 0; t < nt; t++)
        for (int64_t r = 0; r < rows; r++) {
          const int64_t o = rb * 16 + r;
          const float b = a->bias ? elem(a->bias, o, (int)a->bias_dtype) : 0.f;
          store(y, (t0 + t) * ldy + col0 + o, tot[t * 16 + r] + b, x_dtype);
        }
    }
  }
};

}  // namespace
#endif

extern "C" {

// y[T, out_0 + out_1 + ...] = [x @ W_0.T + bias_0 | x @ W_1.T + bias_1 | ...] for n prepared
// layers that share their input (a merged layer's sub-matrices: q, k and v, or gate and up),
// each through the prepared buffers; x [T, in] and y of x_dtype (0 fp32, 1 fp16, 2 bf16).
// One call and one parallel region over every part's row blocks, instead of a call, a fork
// and a copy (the concatenation) per part. Returns 0; 1/2 for a format the path does not take
// (or parts of different widths: 1); 3 when this CPU (or the instruction-set cap) lacks it.
int fasq_cpu_int8_linear_parts(const Int8Layer* const* parts, int n, const void* x, int x_dtype, int64_t T,
                               void* y, int nthreads) {
  if (n < 1) return 1;
  for (int i = 0; i < n; i++) {
    if (int err = supported(*parts[i]->args, false)) return err;
    if (parts[i]->args->in != parts[0]->args->in) return 1;
  }
  if (!fasq_cpu_int8_available()) return 3;
  if (T <= 0) return 0;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  std::vector<PartCall> calls(n);
  std::vector<int64_t> first(n + 1, 0);  // parts' first row block among all of them
  std::vector<int> own;                  // parts that quantize x themselves
  int64_t cols = 0, weights = 0;
  for (int i = 0; i < n; i++) {
    calls[i].setup(parts[i], T, cols, calls.data(), i);
    if (calls[i].src == &calls[i]) own.push_back(i);
    cols += parts[i]->args->out, weights += parts[i]->args->out * parts[i]->args->in;
    first[i + 1] = first[i] + calls[i].OB;
  }
  const int nth = fasq_cpu::threads_for(weights, nthreads);
  const int64_t nq = (int64_t)own.size() * T;
#pragma omp parallel num_threads(nth) if (nth > 1)
  {
    // x quantized per (part, token) across the threads, then (after the loop's barrier) the
    // row blocks of every part
#pragma omp for schedule(static)
    for (int64_t k = 0; k < nq; k++) calls[own[k / T]].quantize(x, x_dtype, k % T);
    alignas(64) float tot[NT_MAX * 16];
#pragma omp for schedule(static)
    for (int64_t j = 0; j < first[n]; j++) {
      int i = 0;
      while (j >= first[i + 1]) i++;
      calls[i].row_block(j - first[i], T, y, cols, x_dtype, tot);
    }
  }
  return 0;
#else
  (void)x, (void)x_dtype, (void)y, (void)nthreads;
  return 3;
#endif
}

// y[T, out] = x[T, in] @ W.T + bias through the prepared buffers; x and y of x_dtype (0 fp32,
// 1 fp16, 2 bf16), 1 <= T. Returns 0; 1/2 for a format the path does not take; 3 when this
// CPU (or the instruction-set cap) lacks the path.
int fasq_cpu_int8_linear(const Int8Layer* p, const void* x, int x_dtype, int64_t T, void* y, int nthreads) {
  return fasq_cpu_int8_linear_parts(&p, 1, x, x_dtype, T, y, nthreads);
}

}  // extern "C"
