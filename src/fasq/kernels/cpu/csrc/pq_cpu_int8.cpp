// fasq CPU decode through int8 lookups and integer dot products: the layers' preparation, the
// C ABI and the thread split. The kernels: pq_cpu_int8_avx512.cpp (AVX-512 VBMI + VNNI, every
// format below) and pq_cpu_int8_avx2.cpp (AVX2: K <= 16 and the 8-bit grid, same layouts);
// pq_cpu_int8.h is what they share. The Python side is fasq/kernels/cpu/int8.py (kernel
// "cpu_int8"); the exact float kernels are in pq_cpu.cpp. Why: the float kernel needs one
// table access per code (about a code per cycle); here 64 codes are looked up per instruction
// (32 on AVX2), so decode runs near memory speed.
//
// Formats: one-byte codes with d=2, K <= 256 (the default d=2 K=256, and d=2 K=64), or
// d=1, K <= 16 (d=1 K=16, and RTN at 1-4 bits: a grid codebook 0..K-1 with a scale and a
// minimum per group), or RTN at 8 bits (d=1, the grid 0..255); codebook runs and scale
// groups a multiple of 8 columns. Anything else: the caller keeps the float path
// (fasq_cpu_int8_sizes says so). The AVX2 kernels take d=2 only with K <= 16.
// Below, the AVX-512 kernels; the AVX2 ones differ as pq_cpu_int8_avx2.cpp says.
//
// Load time (fasq_cpu_int8_prepare, once per layer; the checkpoint is unchanged):
//   codes   uint8 [OB][M/4][16][4]   OB = ceil(out/16) row blocks; a 64-byte step holds 4
//                                    consecutive codes of each of 16 rows (one 32-bit lane
//                                    per row), padding rows code 0
//   tabs    uint8 [C][2][256]        first / second value of each centroid as int8 + shift
//                                    (vpdpbusd multiplies unsigned by signed bytes)
//   cbscale float [3][C]             [0] the codebook's int8 step: max |value| / 127, or 1
//                                    when every value is an integer in [-127, 127] (RTN's
//                                    grid: then the copy is exact); [1] its shift: the bytes
//                                    added to its table (0 when those integers are >= 0,
//                                    else 128) + the grid's centre (RTN, see prepare);
//                                    [2] how AVX2 multiplies its bytes (SignMode)
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
#include "pq_cpu_int8.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using namespace fasq_int8;  // pq_cpu_int8.h

using LayerArgs = FasqLayerArgs;  // pq_cpu.h

using fasq_cpu::elem;   // pq_cpu_kernels.h: a value of fp32 / fp16 / bf16 storage, by run-time dtype
using fasq_cpu::store;
using fasq_cpu::CB_F32;  // dtype codes of x and y (and of stored tensors)
using fasq_cpu::CB_F16;
using fasq_cpu::CB_BF16;

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

// The int8 kernels this CPU runs now (the instruction-set cap, FASQ_CPU_ISA / fasq_cpu_set_isa,
// included): 2 AVX-512 VBMI + VNNI (every format), 1 AVX2 (the formats kernels_take), 0 none.
int level() {
  const int isa = fasq_cpu_isa_level();
  return isa >= 2 && avx512_cpu() ? 2 : isa >= 1 && avx2_cpu() ? 1 : 0;
}

// The formats the path takes: d=2 K <= 256, d=1 K <= 16, and d=1 K=256 (only as the 8-bit grid,
// which `supported` checks on the codebooks).
inline bool format_taken(int64_t d, int64_t K) { return K >= 1 && ((d == 2 && K <= 256) || (d == 1 && (K <= 16 || K == 256))); }

// Whether the kernels of level lv (level()) run a format the path takes: AVX-512 all of them,
// AVX2 those it looks up by vpshufb in 16-entry tables (K <= 16) or takes as they are (d=1
// K=256: the 8-bit grid).
inline bool kernels_take(int lv, int64_t d, int64_t K) { return lv == 2 || (lv == 1 && (K <= 16 || d == 1)); }

// 0 when the int8 path takes this layer, else why not (1 format, 2 alignment). `grid`: also
// scan a d=1 K=256 layer's codebooks for the 8-bit grid (prepare does; a call trusts the
// layer it prepared, whose codebooks the caller keeps unchanged).
int supported(const LayerArgs& a, bool grid = true) {
  const bool fmt = format_taken(a.d, a.K) && !(a.d == 1 && a.K == 256 && grid && !byte_grid(a));
  if (!fmt || a.code_bytes != 1 || a.in <= 0 || a.out <= 0 || a.in % a.d) return 1;
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

}  // namespace

extern "C" {

// Which int8 kernels this CPU runs now, the instruction-set cap (FASQ_CPU_ISA,
// fasq_cpu_set_isa) included: 2 AVX-512 F/BW/VL + VBMI + VNNI (every format of the path), 1
// AVX2 + FMA (d=1 or d=2 with K <= 16, and the 8-bit grid), 0 none.
int fasq_cpu_int8_available(void) { return level(); }

// Whether the int8 kernels this CPU runs now take a layer of this format (d, K), as far as the
// format goes (its codebooks and alignment are checked when it is prepared).
int fasq_cpu_int8_takes(int64_t d, int64_t K) {
  return format_taken(d, K) && kernels_take(level(), d, K) ? 1 : 0;
}

// How d=2 layers with 64 < K <= 256 look their codes up now (AVX-512): 1 vpermi2b, 2 vpermb.
int fasq_cpu_int8_lookup(void) { return avx512_lookup(); }

// Set how d=2 layers with 64 < K <= 256 look their codes up from later calls on (1 vpermi2b,
// 2 vpermb; 0 the default for this CPU); returns the previous setting (1 or 2).
int fasq_cpu_int8_set_lookup(int how) { return avx512_set_lookup(how); }

// Sizes of a layer's prepared buffers: sizes[0] code bytes, [1] table bytes, [2] codebook
// floats (step, shift and sign mode of each), [3] scale floats, [4] offset floats (0 without
// offsets). Returns 0, or
// nonzero when the int8 path does not take this format (1) or its alignment (2).
int fasq_cpu_int8_sizes(const LayerArgs* a, int64_t* sizes) {
  if (int err = supported(*a)) return err;
  const int64_t OB = (a->out + 15) / 16, G = n_groups(*a);
  const Layout lay = layout(*a);
  sizes[0] = OB * 16 * (lay == BYTES ? a->in : a->in / 2);  // PAIRS and NIBBLES: a byte per 2 columns
  sizes[1] = a->C * (lay == PAIRS ? 512 : lay == NIBBLES ? 64 : 0);
  sizes[2] = 3 * a->C;
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
  std::vector<float> step(C, 1.f), added(C, 0.f), mid(C, 0.f), vmax_c(C, 0.f);
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
    mid[c] = (vmin + vmax) / 2, vmax_c[c] = vmax;
    centre = centre && integral && vmin >= 0.f && mid[c] == mid[0];
  }
  const float z = centre ? mid[0] : 0.f;
  for (int64_t c = 0; c < C; c++) {
    // AVX2's SignMode: the 8-bit grid's codes and tables with 128 added are multiplied as
    // signed bytes (the value, with the 128 taken off the shift); integer tables up to 32 as
    // they are
    const bool shifted = lay == BYTES || added[c] == 128.f;
    cbscale[c] = step[c], cbscale[C + c] = added[c] + z;
    cbscale[2 * C + c] = shifted ? SIGNED_SHIFTED : vmax_c[c] <= 32.f ? SMALL : SIGNED;
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

namespace {

// One prepared layer's share of a call: its runs, its first output column and its quantized
// activations (quantize_token), or those of an earlier part with the same runs (src): parts
// of a merged layer usually cut x alike, and then x is quantized once for them.
struct PartCall {
  const Int8Layer* p;
  const PartCall* src = this;  // whose xq, xs, xb, xsum, rq this part reads
  std::vector<Run> runs;
  std::vector<int8_t> xq;
  std::vector<float> xs, xsum, rq;
  std::vector<int32_t> xb;
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
    xq.resize(T * a->in), xs.resize(T * nblk), xb.resize(T * nblk), rq.resize(T * R);
    if (p->offsets) xsum.resize(T * R);
  }

  // Token t of x into this part's own buffers, by the kernels of level lv (level()).
  void quantize(int lv, const void* x, int x_dtype, int64_t t) {
    const LayerArgs* a = p->args;
    const int64_t R = runs.size();
    (lv == 2 ? avx512_quantize : avx2_quantize)(static_cast<const char*>(x) + t * a->in * fasq_cpu::elem_bytes(x_dtype), x_dtype, runs.data(), R,
                   a->d, xq.data() + t * a->in, xs.data() + t * nblk, xb.data() + t * nblk, rq.data() + t * R,
                   p->offsets ? xsum.data() + t * R : nullptr);
  }

  // Row block rb, all T tokens (a pass per NT_MAX of them with AVX-512, NT_MAX_AVX2 with AVX2:
  // kernels of level lv): y[t, col0 + row] (+ bias), rows ldy apart.
  void row_block(int lv, int64_t rb, int64_t T, void* y, int64_t ldy, int x_dtype, float* tot) const {
    const LayerArgs* a = p->args;
    const int64_t R = runs.size(), M = a->in / a->d, C = a->C;
    const bool off = p->offsets != nullptr;
    const Prepared P{p->codes, p->tabs, p->cbscale, p->cbscale + C, p->cbscale + 2 * C, p->scales, p->offsets};
    const int64_t rows = std::min<int64_t>(16, a->out - rb * 16), pass = lv == 2 ? NT_MAX : NT_MAX_AVX2;
    for (int64_t t0 = 0; t0 < T; t0 += pass) {
      const int nt = (int)std::min<int64_t>(pass, T - t0);
      const Acts at{src->xq.data() + t0 * a->in, src->xs.data() + t0 * nblk, src->xb.data() + t0 * nblk,
                    off ? src->xsum.data() + t0 * R : nullptr, src->rq.data() + t0 * R, nblk, R};
      const BlockFn f = lv == 2 ? avx512_pick(layout(*a), a->K, off, nt) : avx2_pick(layout(*a), off, nt);
      f(runs.data(), R, M, n_groups(*a), P, rb, at, tot);
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

extern "C" {

// y[T, out_0 + out_1 + ...] = [x @ W_0.T + bias_0 | x @ W_1.T + bias_1 | ...] for n prepared
// layers that share their input (a merged layer's sub-matrices: q, k and v, or gate and up),
// each through the prepared buffers; x [T, in] and y of x_dtype (0 fp32, 1 fp16, 2 bf16).
// One call and one parallel region over every part's row blocks, instead of a call, a fork
// and a copy (the concatenation) per part. Returns 0; 1/2 for a format the path does not take
// (or parts of different widths: 1); 3 when this CPU (or the instruction-set cap) lacks the
// kernels of a part's format.
int fasq_cpu_int8_linear_parts(const Int8Layer* const* parts, int n, const void* x, int x_dtype, int64_t T,
                               void* y, int nthreads) {
  if (n < 1) return 1;
  for (int i = 0; i < n; i++) {
    if (int err = supported(*parts[i]->args, false)) return err;
    if (parts[i]->args->in != parts[0]->args->in) return 1;
  }
  const int lv = level();
  for (int i = 0; i < n; i++)
    if (!kernels_take(lv, parts[i]->args->d, parts[i]->args->K)) return 3;
  if (T <= 0) return 0;
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
    for (int64_t k = 0; k < nq; k++) calls[own[k / T]].quantize(lv, x, x_dtype, k % T);
    alignas(64) float tot[NT_MAX * 16];
#pragma omp for schedule(static)
    for (int64_t j = 0; j < first[n]; j++) {
      int i = 0;
      while (j >= first[i + 1]) i++;
      calls[i].row_block(lv, j - first[i], T, y, cols, x_dtype, tot);
    }
  }
  return 0;
}

// y[T, out] = x[T, in] @ W.T + bias through the prepared buffers; x and y of x_dtype (0 fp32,
// 1 fp16, 2 bf16), 1 <= T. Returns 0; 1/2 for a format the path does not take; 3 when this
// CPU (or the instruction-set cap) lacks the path.
int fasq_cpu_int8_linear(const Int8Layer* p, const void* x, int x_dtype, int64_t T, void* y, int nthreads) {
  return fasq_cpu_int8_linear_parts(&p, 1, x, x_dtype, T, y, nthreads);
}

}  // extern "C"
