// fasq CPU kernels for fasq::pq_linear (the Python side is fasq/kernels/cpu/library.py).
//
// A plain C ABI (no Python or torch headers), loaded with ctypes: one binary serves every
// torch version and can ship prebuilt. The instruction set is picked at run time: AVX2+FMA
// on x86-64 when the CPU has it, else portable C that the compiler vectorises for the
// baseline ISA (SSE2 on x86-64, NEON on aarch64). Threads come from OpenMP; loaded after
// torch, the library reuses torch's libgomp (same soname), so both share one thread pool.
//
// One quantized layer W[out, in], M = in / d subspaces:
//   x          fp32 [T, in]           activations
//   codes      [out, M]               uint8 / int16 / int32 (code_bytes 1 / 2 / 4)
//   codebooks  fp32 [C, K, d]         subspace m uses codebook m / (M / C)
//   scales     fp32 [out, S] or NULL  column group g = columns [g*in/S, (g+1)*in/S)
//   offsets    fp32 [out, S] or NULL  W = codebook value * scale + offset
//   bias       fp32 [out] or NULL
//   y          fp32 [T, out]          written (not accumulated)
//
// Decode (fasq_cpu_pq_linear), LUT-free direct compute: each row's codes index the
// codebook (in L1) and the centroids go straight into SIMD registers, multiplied with the
// activations by FMAs; W is never materialised. A row is cut into runs that share one
// codebook and one scale group; a run's dot product is scaled once, and offsets use the
// activations' sums over the run (offset * sum(x)). Codebooks larger than a cache budget
// are handled tile by tile (all rows of a thread per tile) so that one stays hot.
// Prefill (fasq_cpu_dequantize): rebuild W once per call into a caller's buffer.

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "pq_cpu.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASQ_X86 1
#include <immintrin.h>
#define FASQ_AVX2 __attribute__((target("avx2,fma,f16c")))
#define FASQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#else
#define FASQ_X86 0
#endif

namespace {

constexpr int MAX_NT = 4;                  // tokens per pass (register-resident accumulators)
// Codebook bytes one column tile may touch: an L2's share (a 32 KB L1 cannot hold even one
// fp16 d=4 K=4096 codebook, so tiling for L1 only breaks the row-major code stream).
constexpr int64_t CODEBOOK_BUDGET = 256 << 10;
constexpr int64_t GENERIC_CHUNK = 512;     // floats decoded at once by the portable path
constexpr int64_t PARALLEL_MIN_WEIGHTS = 1 << 16;  // smaller layers run on one thread
constexpr int64_t ROW_BLOCK = 64;          // rows per block when codebooks come in several tiles

struct Run {  // subspaces [m0, m1) of a row, all in codebook c and scale group g
  int64_t m0, m1, c, g;
};

// Cut [0, M) at codebook and scale-group boundaries. span: subspaces per codebook;
// gsub: subspaces per scale group (M when there are no scales).
std::vector<Run> make_runs(int64_t M, int64_t span, int64_t gsub) {
  std::vector<Run> runs;
  for (int64_t m = 0; m < M;) {
    int64_t c = m / span, g = m / gsub;
    int64_t end = std::min((c + 1) * span, (g + 1) * gsub);
    runs.push_back({m, end, c, g});
    m = end;
  }
  return runs;
}

// Column tiles: index of each tile's first run (plus a final sentinel), so that the
// codebooks one tile uses fit CODEBOOK_BUDGET (at least one codebook per tile).
std::vector<size_t> make_tiles(const std::vector<Run>& runs, int64_t codebook_bytes) {
  std::vector<size_t> starts{0};
  int64_t first_c = runs.empty() ? 0 : runs[0].c;
  for (size_t r = 1; r < runs.size(); r++) {
    if (runs[r].c != first_c && (runs[r].c - first_c + 1) * codebook_bytes > CODEBOOK_BUDGET) {
      starts.push_back(r);
      first_c = runs[r].c;
    }
  }
  starts.push_back(runs.size());
  return starts;
}

// Element types of codebooks and scales (the `*_dtype` arguments of the C API).
enum { CB_F32 = 0, CB_F16 = 1, CB_BF16 = 2 };
struct Half {};  // IEEE fp16 tag
struct BF16 {};  // bfloat16 tag

inline float half_to_float(uint16_t h) {  // IEEE fp16 -> float, portable
  const uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, m = h & 1023;
  uint32_t u;
  if (e == 0) {
    float f = m * (1.f / 16777216.f);  // subnormal: m * 2^-24
    memcpy(&u, &f, 4);
    u |= s;
  } else if (e == 31) {
    u = s | 0x7f800000u | (m << 13);
  } else {
    u = s | ((e + 112) << 23) | (m << 13);
  }
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline float bf16_to_float(uint16_t h) {
  const uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline float elem(const void* p, int64_t j, float) { return static_cast<const float*>(p)[j]; }
inline float elem(const void* p, int64_t j, Half) { return half_to_float(static_cast<const uint16_t*>(p)[j]); }
inline float elem(const void* p, int64_t j, BF16) { return bf16_to_float(static_cast<const uint16_t*>(p)[j]); }
inline float elem(const void* p, int64_t j, int dtype) {  // run-time dtype (scales)
  return dtype == CB_F16 ? elem(p, j, Half{}) : dtype == CB_BF16 ? elem(p, j, BF16{}) : elem(p, j, 0.f);
}
inline int64_t elem_bytes(int dtype) { return dtype == CB_F32 ? 4 : 2; }

inline uint16_t float_to_bf16(float f) {  // round to nearest even, NaN kept quiet
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

inline uint16_t float_to_half(float f) {  // IEEE fp16, round to nearest even, portable
  uint32_t u;
  memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);           // NaN
  if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);          // overflow -> inf
  if (a < 0x38800000u) {                                            // subnormal or zero
    float mag;
    memcpy(&mag, &a, 4);
    return (uint16_t)(sign | (uint32_t)__builtin_lrintf(mag * 16777216.f));  // units of 2^-24
  }
  const uint32_t r = a + 0x0fffu + ((a >> 13) & 1u) - (112u << 23);
  return (uint16_t)(sign | (r >> 13));
}

inline int64_t read_code(const char* row, int64_t m, int code_bytes) {
  if (code_bytes == 1) return reinterpret_cast<const uint8_t*>(row)[m];
  if (code_bytes == 2) return reinterpret_cast<const uint16_t*>(row)[m];
  return reinterpret_cast<const int32_t*>(row)[m];
}

inline void store(void* p, int64_t j, float v, int dtype) {
  if (dtype == CB_F32) static_cast<float*>(p)[j] = v;
  else if (dtype == CB_BF16) static_cast<uint16_t*>(p)[j] = float_to_bf16(v);
  else static_cast<uint16_t*>(p)[j] = float_to_half(v);
}

// One call's arguments, shared by all threads. Codebooks: [C, K, d] of cb_dtype; scales
// and offsets [out, S] of scale_dtype; xsum [T, R]: activations summed over each run.
struct Layer {
  const float* x;
  int64_t in, M, d, K;
  const char* codes;
  int code_bytes;
  const char* cb;
  int64_t cb_bytes;  // bytes of one codebook
  const void* scales;
  const void* offsets;
  int scale_dtype;
  int64_t S;
  const Run* runs;
  const float* xsum;
  int64_t R;

  float scale(int64_t o, int64_t g) const { return scales ? elem(scales, o * S + g, scale_dtype) : 1.f; }
  // offset * sum(x over run r) for token t, or 0 without offsets
  float offset_term(int64_t o, int64_t r, int64_t t) const {
    return offsets ? elem(offsets, o * S + runs[r].g, scale_dtype) * xsum[t * R + r] : 0.f;
  }
};

// A row kernel: tot[t] = row o's dot products with tokens t0 .. t0+nt-1 over runs [r0, r1)
// (scales and offsets applied). buf: GENERIC_CHUNK floats of scratch.
typedef void (*RowFn)(const Layer& L, size_t r0, size_t r1, int64_t o, int64_t t0, int nt, float* tot,
                      float* buf);

// --- portable path: decode a chunk into an L1 buffer, then vectorisable dot products -----

template <typename CodeT, typename CbT>
void row_generic(const Layer& L, size_t r0, size_t r1, int64_t o, int64_t t0, int nt, float* tot, float* buf) {
  const CodeT* crow = reinterpret_cast<const CodeT*>(L.codes) + o * L.M;
  const int64_t d = L.d, per_chunk = std::max<int64_t>(1, GENERIC_CHUNK / d);
  for (int t = 0; t < nt; t++) tot[t] = 0.f;
  for (size_t r = r0; r < r1; r++) {
    const Run& run = L.runs[r];
    const void* cbk = L.cb + run.c * L.cb_bytes;
    float acc[MAX_NT] = {0.f, 0.f, 0.f, 0.f};
    for (int64_t i0 = run.m0; i0 < run.m1; i0 += per_chunk) {
      const int64_t n = std::min(per_chunk, run.m1 - i0);
      for (int64_t i = 0; i < n; i++) {
        const int64_t base = (int64_t)crow[i0 + i] * d;
        for (int64_t j = 0; j < d; j++) buf[i * d + j] = elem(cbk, base + j, CbT{});
      }
      for (int t = 0; t < nt; t++) {
        const float* xp = L.x + (t0 + t) * L.in + i0 * d;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < n * d; j++) s += buf[j] * xp[j];
        acc[t] += s;
      }
    }
    const float sc = L.scale(o, run.g);
    for (int t = 0; t < nt; t++) tot[t] += sc * acc[t] + L.offset_term(o, r, t0 + t);
  }
}

// A dequantize kernel: row o of W (runs [0, R)) into `w` as fp32 or bf16 (w_dtype).
typedef void (*DequantFn)(const Layer& L, int64_t o, void* w, int w_dtype);

template <typename CodeT, typename CbT>
void dequant_generic(const Layer& L, int64_t o, void* w, int w_dtype) {
  const CodeT* crow = reinterpret_cast<const CodeT*>(L.codes) + o * L.M;
  const int64_t d = L.d;
  for (int64_t r = 0; r < L.R; r++) {
    const Run& run = L.runs[r];
    const void* cbk = L.cb + run.c * L.cb_bytes;
    const float sc = L.scale(o, run.g), off = L.offsets ? elem(L.offsets, o * L.S + run.g, L.scale_dtype) : 0.f;
    for (int64_t m = run.m0; m < run.m1; m++) {
      const int64_t base = (int64_t)crow[m] * d;
      for (int64_t j = 0; j < d; j++) store(w, m * d + j, elem(cbk, base + j, CbT{}) * sc + off, w_dtype);
    }
  }
}

#if FASQ_X86
// --- AVX2 + FMA path: centroids gathered straight into registers -------------------------

FASQ_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 halves -> 8 floats.
FASQ_AVX2 inline __m256 widen(__m128i h, Half) { return _mm256_cvtph_ps(h); }
FASQ_AVX2 inline __m256 widen(__m128i h, BF16) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// Four codes as integers from one load.
template <typename CodeT>
FASQ_AVX2 inline void codes4(const CodeT* c, int64_t* k) {
  if (sizeof(CodeT) == 1) {
    uint32_t w;
    memcpy(&w, c, 4);
    k[0] = w & 255; k[1] = (w >> 8) & 255; k[2] = (w >> 16) & 255; k[3] = w >> 24;
  } else {
    uint64_t w;
    memcpy(&w, c, 8);
    k[0] = w & 0xffff; k[1] = (w >> 16) & 0xffff; k[2] = (w >> 32) & 0xffff; k[3] = w >> 48;
  }
}

// Centroids<D, CbT>::get(codebook, codes): the 8 weights of 8 / D consecutive codes.
template <int D, typename CbT> struct Centroids;

template <> struct Centroids<2, float> {  // four 64-bit loads
  template <typename CodeT>
  FASQ_AVX2 static inline __m256 get(const void* cb, const CodeT* c) {
    const double* p = static_cast<const double*>(cb);
    int64_t k[4];
    codes4(c, k);
    __m128d lo = _mm_loadh_pd(_mm_load_sd(p + k[0]), p + k[1]);
    __m128d hi = _mm_loadh_pd(_mm_load_sd(p + k[2]), p + k[3]);
    return _mm256_castpd_ps(_mm256_insertf128_pd(_mm256_castpd128_pd256(lo), hi, 1));
  }
};
template <typename H> struct Centroids<2, H> {  // four 32-bit loads, widened
  template <typename CodeT>
  FASQ_AVX2 static inline __m256 get(const void* cb, const CodeT* c) {
    const int32_t* p = static_cast<const int32_t*>(cb);
    int64_t k[4];
    codes4(c, k);
    __m128i v = _mm_cvtsi32_si128(p[k[0]]);
    v = _mm_insert_epi32(v, p[k[1]], 1);
    v = _mm_insert_epi32(v, p[k[2]], 2);
    v = _mm_insert_epi32(v, p[k[3]], 3);
    return widen(v, H{});
  }
};
template <> struct Centroids<4, float> {  // two 128-bit loads
  template <typename CodeT>
  FASQ_AVX2 static inline __m256 get(const void* cb, const CodeT* c) {
    const float* p = static_cast<const float*>(cb);
    __m256 w = _mm256_castps128_ps256(_mm_loadu_ps(p + 4 * (int64_t)c[0]));
    return _mm256_insertf128_ps(w, _mm_loadu_ps(p + 4 * (int64_t)c[1]), 1);
  }
};
template <typename H> struct Centroids<4, H> {  // two 64-bit loads, widened
  template <typename CodeT>
  FASQ_AVX2 static inline __m256 get(const void* cb, const CodeT* c) {
    const int64_t* p = static_cast<const int64_t*>(cb);
    return widen(_mm_insert_epi64(_mm_cvtsi64_si128(p[c[0]]), p[c[1]], 1), H{});
  }
};
template <> struct Centroids<8, float> {  // one 256-bit load
  template <typename CodeT>
  FASQ_AVX2 static inline __m256 get(const void* cb, const CodeT* c) {
    return _mm256_loadu_ps(static_cast<const float*>(cb) + 8 * (int64_t)c[0]);
  }
};
template <typename H> struct Centroids<8, H> {  // one 128-bit load, widened
  template <typename CodeT>
  FASQ_AVX2 static inline __m256 get(const void* cb, const CodeT* c) {
    return widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(cb) + 8 * (int64_t)c[0])), H{});
  }
};

// 8 consecutive codes as 32-bit lanes.
template <typename CodeT>
FASQ_AVX2 inline __m256i load_idx8(const CodeT* c) {
  if (sizeof(CodeT) == 1) return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c)));
  return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
}

// Row skeleton shared by all AVX2 kernels. Per run: `load(cbk, c, i)` gives the 8 weights
// of codes i .. i+STEP-1 (two accumulators per token hide the FMA latency), codes left
// over go through `tail` (scalar); the run's sum is scaled in registers (one FMA per
// token and run) and one horizontal sum per token ends the row. `prepare(run)` runs
// before each run (d=1 loads its table there).
template <int NT, int STEP, typename Prepare, typename Load, typename Tail>
FASQ_AVX2 inline void row_loop(const Layer& L, size_t r0, size_t r1, int64_t o, int64_t t0, float* tot,
                               Prepare prepare, Load load, Tail tail) {
  const int64_t d = L.d;
  __m256 tv[NT];
  float ts[NT];
  for (int t = 0; t < NT; t++) tv[t] = _mm256_setzero_ps(), ts[t] = 0.f;
  for (size_t r = r0; r < r1; r++) {
    const Run& run = L.runs[r];
    prepare(run);
    const int64_t n = run.m1 - run.m0;
    const float* xt[NT];
    for (int t = 0; t < NT; t++) xt[t] = L.x + (t0 + t) * L.in + run.m0 * d;
    __m256 a0[NT], a1[NT];
    for (int t = 0; t < NT; t++) a0[t] = a1[t] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 2 * STEP <= n; i += 2 * STEP) {
      const __m256 w0 = load(run, i), w1 = load(run, i + STEP);
      for (int t = 0; t < NT; t++) {
        a0[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xt[t] + i * d), a0[t]);
        a1[t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xt[t] + i * d + 8), a1[t]);
      }
    }
    for (; i + STEP <= n; i += STEP) {
      const __m256 w0 = load(run, i);
      for (int t = 0; t < NT; t++) a0[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xt[t] + i * d), a0[t]);
    }
    const float sc = L.scale(o, run.g);
    const __m256 sv = _mm256_set1_ps(sc);
    float tl[NT] = {};
    for (; i < n; i++) tail(run, i, xt, tl);
    for (int t = 0; t < NT; t++) {
      tv[t] = _mm256_fmadd_ps(_mm256_add_ps(a0[t], a1[t]), sv, tv[t]);
      ts[t] += sc * tl[t] + L.offset_term(o, r, t0 + t);
    }
  }
  for (int t = 0; t < NT; t++) tot[t] = hsum(tv[t]) + ts[t];
}

// d in {2, 4, 8}; CbT: float (fp32 codebook) or Half / BF16 (16-bit).
template <int D, typename CodeT, typename CbT, int NT>
FASQ_AVX2 void row_avx2(const Layer& L, size_t r0, size_t r1, int64_t o, int64_t t0, int, float* tot, float*) {
  const CodeT* crow = reinterpret_cast<const CodeT*>(L.codes) + o * L.M;
  row_loop<NT, 8 / D>(
      L, r0, r1, o, t0, tot, [](const Run&) {},
      [&](const Run& run, int64_t i) FASQ_AVX2 {
        return Centroids<D, CbT>::get(L.cb + run.c * L.cb_bytes, crow + run.m0 + i);
      },
      [&](const Run& run, int64_t i, const float* const* xt, float* tl) {
        const void* cbk = L.cb + run.c * L.cb_bytes;
        const int64_t base = (int64_t)crow[run.m0 + i] * D;
        for (int j = 0; j < D; j++) {
          const float w = elem(cbk, base + j, CbT{});
          for (int t = 0; t < NT; t++) tl[t] += w * xt[t][D * i + j];
        }
      });
}

// d=1 (RTN and scalar PQ): K <= 16 looks codes up in registers (vpermps + blend); larger
// fp32 codebooks are gathered (16-bit ones with K > 16 take the portable path).
template <typename CodeT, typename CbT, int NT>
FASQ_AVX2 void row_avx2_d1(const Layer& L, size_t r0, size_t r1, int64_t o, int64_t t0, int, float* tot, float*) {
  const CodeT* crow = reinterpret_cast<const CodeT*>(L.codes) + o * L.M;
  const int64_t K = L.K;
  alignas(32) float tab[16] = {0};
  __m256 lo = _mm256_setzero_ps(), hi = lo;
  int64_t loaded = -1;  // codebook now in lo/hi
  auto tail = [&](const Run& run, int64_t i, const float* const* xt, float* tl) {
    const float w = elem(L.cb + run.c * L.cb_bytes, crow[run.m0 + i], CbT{});
    for (int t = 0; t < NT; t++) tl[t] += w * xt[t][i];
  };
  if (K <= 16) {
    row_loop<NT, 8>(
        L, r0, r1, o, t0, tot,
        [&](const Run& run) FASQ_AVX2 {
          if (run.c == loaded) return;
          for (int64_t k = 0; k < K; k++) tab[k] = elem(L.cb + run.c * L.cb_bytes, k, CbT{});
          lo = _mm256_load_ps(tab), hi = _mm256_load_ps(tab + 8), loaded = run.c;
        },
        [&](const Run& run, int64_t i) FASQ_AVX2 {
          const __m256i idx = load_idx8(crow + run.m0 + i);
          const __m256 sel = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));  // bit 3 -> sign
          return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx), sel);
        },
        tail);
  } else {
    row_loop<NT, 8>(
        L, r0, r1, o, t0, tot, [](const Run&) {},
        [&](const Run& run, int64_t i) FASQ_AVX2 {
          const float* cbk = reinterpret_cast<const float*>(L.cb + run.c * L.cb_bytes);
          return _mm256_i32gather_ps(cbk, load_idx8(crow + run.m0 + i), 4);
        },
        tail);
  }
}

// 8 floats to 8 bf16 (round to nearest even; weights are finite).
FASQ_AVX2 inline void store_bf16x8(uint16_t* p, __m256 v) {
  __m256i u = _mm256_castps_si256(v);
  u = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
  u = _mm256_srli_epi32(u, 16);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1)));
}

// Dequantize row o: 8 weights at a time from `load(run, i)` (STEP codes), times the run's
// scale plus its offset, stored as fp32 or bf16; leftover codes go through the portable
// element loop.
template <int STEP, typename CbT, typename Prepare, typename Load>
FASQ_AVX2 inline void dequant_loop(const Layer& L, int64_t o, const void* crow_, int code_bytes, void* w, int w_dtype,
                                   Prepare prepare, Load load) {
  const int64_t d = L.d;
  for (int64_t r = 0; r < L.R; r++) {
    const Run& run = L.runs[r];
    prepare(run);
    const float sc = L.scale(o, run.g), off = L.offsets ? elem(L.offsets, o * L.S + run.g, L.scale_dtype) : 0.f;
    const __m256 sv = _mm256_set1_ps(sc), ov = _mm256_set1_ps(off);
    const int64_t n = run.m1 - run.m0;
    int64_t i = 0;
    for (; i + STEP <= n; i += STEP) {
      const __m256 v = _mm256_fmadd_ps(load(run, i), sv, ov);
      const int64_t col = (run.m0 + i) * d;
      if (w_dtype == CB_F32) _mm256_storeu_ps(static_cast<float*>(w) + col, v);
      else store_bf16x8(static_cast<uint16_t*>(w) + col, v);
    }
    const void* cbk = L.cb + run.c * L.cb_bytes;
    for (; i < n; i++) {
      const int64_t m = run.m0 + i, base = read_code(static_cast<const char*>(crow_), m, code_bytes) * d;
      for (int64_t j = 0; j < d; j++) store(w, m * d + j, elem(cbk, base + j, CbT{}) * sc + off, w_dtype);
    }
  }
}

template <int D, typename CodeT, typename CbT>
FASQ_AVX2 void dequant_avx2(const Layer& L, int64_t o, void* w, int w_dtype) {
  const CodeT* crow = reinterpret_cast<const CodeT*>(L.codes) + o * L.M;
  if constexpr (D == 1) {
    alignas(32) float tab[16] = {0};
    __m256 lo = _mm256_setzero_ps(), hi = lo;
    int64_t loaded = -1;
    dequant_loop<8, CbT>(
        L, o, crow, sizeof(CodeT), w, w_dtype,
        [&](const Run& run) FASQ_AVX2 {
          if (run.c == loaded) return;
          for (int64_t k = 0; k < L.K; k++) tab[k] = elem(L.cb + run.c * L.cb_bytes, k, CbT{});
          lo = _mm256_load_ps(tab), hi = _mm256_load_ps(tab + 8), loaded = run.c;
        },
        [&](const Run& run, int64_t i) FASQ_AVX2 {
          const __m256i idx = load_idx8(crow + run.m0 + i);
          const __m256 sel = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
          return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx), sel);
        });
  } else {
    dequant_loop<8 / D, CbT>(
        L, o, crow, sizeof(CodeT), w, w_dtype, [](const Run&) {},
        [&](const Run& run, int64_t i) FASQ_AVX2 {
          return Centroids<D, CbT>::get(L.cb + run.c * L.cb_bytes, crow + run.m0 + i);
        });
  }
}

template <int D, typename CodeT>
DequantFn dequant_cb(int cb_dtype) {
  if (cb_dtype == CB_F16) return dequant_avx2<D, CodeT, Half>;
  if (cb_dtype == CB_BF16) return dequant_avx2<D, CodeT, BF16>;
  return dequant_avx2<D, CodeT, float>;
}

template <typename CodeT>
DequantFn avx2_dequant_for(int64_t d, int64_t K, int cb_dtype) {
  if (d == 1 && K <= 16) return dequant_cb<1, CodeT>(cb_dtype);
  if (d == 2) return dequant_cb<2, CodeT>(cb_dtype);
  if (d == 4) return dequant_cb<4, CodeT>(cb_dtype);
  if (d == 8) return dequant_cb<8, CodeT>(cb_dtype);
  return nullptr;
}

template <int D, typename CodeT, typename CbT>
RowFn avx2_nt(int nt) {
  if constexpr (D == 1) {
    switch (nt) {
      case 1: return row_avx2_d1<CodeT, CbT, 1>;
      case 2: return row_avx2_d1<CodeT, CbT, 2>;
      case 3: return row_avx2_d1<CodeT, CbT, 3>;
      default: return row_avx2_d1<CodeT, CbT, 4>;
    }
  } else {
    switch (nt) {
      case 1: return row_avx2<D, CodeT, CbT, 1>;
      case 2: return row_avx2<D, CodeT, CbT, 2>;
      case 3: return row_avx2<D, CodeT, CbT, 3>;
      default: return row_avx2<D, CodeT, CbT, 4>;
    }
  }
}

template <int D, typename CodeT>
RowFn avx2_cb(int cb_dtype, int nt) {
  if (cb_dtype == CB_F16) return avx2_nt<D, CodeT, Half>(nt);
  if (cb_dtype == CB_BF16) return avx2_nt<D, CodeT, BF16>(nt);
  return avx2_nt<D, CodeT, float>(nt);
}

// The AVX2 kernel for (d, K, code type, codebook dtype, tokens), or NULL where the portable
// path serves.
template <typename CodeT>
RowFn avx2_for(int64_t d, int64_t K, int cb_dtype, int nt) {
  if (d == 1 && (cb_dtype == CB_F32 || K <= 16)) return avx2_cb<1, CodeT>(cb_dtype, nt);
  if (d == 2) return avx2_cb<2, CodeT>(cb_dtype, nt);
  if (d == 4) return avx2_cb<4, CodeT>(cb_dtype, nt);
  if (d == 8) return avx2_cb<8, CodeT>(cb_dtype, nt);
  return nullptr;
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
}

// --- AVX-512: small codebooks looked up in registers ---------------------------------------

bool cpu_has_avx512() {
  static const bool has = cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return has;
}

FASQ_AVX512 inline __m512 widen16(__m256i h, Half) { return _mm512_cvtph_ps(h); }
FASQ_AVX512 inline __m512 widen16(__m256i h, BF16) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// d=2 with at most 128 centroids of 16-bit values (one 32-bit word each, 3 to 7-bit codes):
// the codebook sits in up to 8 zmm registers and 16 codes are looked up at once by
// vpermi2d (32 entries per register pair) and masked blends on code bits 5 and 6, instead
// of one load and one insert per code as in the AVX2 kernel.
template <typename CbT, int NT>
FASQ_AVX512 void row_avx512_d2_small(const Layer& L, size_t r0, size_t r1, int64_t o, int64_t t0, int, float* tot,
                                     float*) {
  const uint8_t* crow = reinterpret_cast<const uint8_t*>(L.codes) + o * L.M;
  const int64_t K = L.K;
  __m512i tab[8];
  for (int j = 0; j < 8; j++) tab[j] = _mm512_setzero_si512();
  int64_t loaded = -1;
  const __m512i bit5 = _mm512_set1_epi32(32), bit6 = _mm512_set1_epi32(64);
  __m512 tv[NT];
  float ts[NT];
  for (int t = 0; t < NT; t++) tv[t] = _mm512_setzero_ps(), ts[t] = 0.f;
  for (size_t r = r0; r < r1; r++) {
    const Run& run = L.runs[r];
    const void* cbk = L.cb + run.c * L.cb_bytes;
    if (run.c != loaded) {
      const int32_t* words = static_cast<const int32_t*>(cbk);
      for (int64_t j = 0; j * 16 < K; j++) {
        const int64_t n = std::min<int64_t>(16, K - j * 16);
        tab[j] = _mm512_maskz_loadu_epi32((__mmask16)((1u << n) - 1), words + j * 16);
      }
      loaded = run.c;
    }
    const int64_t n = run.m1 - run.m0;
    const float* xt[NT];
    for (int t = 0; t < NT; t++) xt[t] = L.x + (t0 + t) * L.in + run.m0 * 2;
    __m512 a0[NT], a1[NT];
    for (int t = 0; t < NT; t++) a0[t] = a1[t] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(crow + run.m0 + i)));
      __m512i v = _mm512_permutex2var_epi32(tab[0], idx, tab[1]);
      if (K > 32) {
        const __m512i hi = _mm512_permutex2var_epi32(tab[2], idx, tab[3]);
        v = _mm512_mask_blend_epi32(_mm512_test_epi32_mask(idx, bit5), v, hi);
      }
      if (K > 64) {
        __m512i v2 = _mm512_permutex2var_epi32(tab[4], idx, tab[5]);
        if (K > 96) {
          const __m512i hi2 = _mm512_permutex2var_epi32(tab[6], idx, tab[7]);
          v2 = _mm512_mask_blend_epi32(_mm512_test_epi32_mask(idx, bit5), v2, hi2);
        }
        v = _mm512_mask_blend_epi32(_mm512_test_epi32_mask(idx, bit6), v, v2);
      }
      const __m512 w0 = widen16(_mm512_castsi512_si256(v), CbT{});
      const __m512 w1 = widen16(_mm512_extracti64x4_epi64(v, 1), CbT{});
      for (int t = 0; t < NT; t++) {
        a0[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xt[t] + 2 * i), a0[t]);
        a1[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xt[t] + 2 * i + 16), a1[t]);
      }
    }
    const float sc = L.scale(o, run.g);
    float tl[NT] = {};
    for (; i < n; i++) {
      const int64_t base = 2 * (int64_t)crow[run.m0 + i];
      const float w0 = elem(cbk, base, CbT{}), w1 = elem(cbk, base + 1, CbT{});
      for (int t = 0; t < NT; t++) tl[t] += w0 * xt[t][2 * i] + w1 * xt[t][2 * i + 1];
    }
    const __m512 sv = _mm512_set1_ps(sc);
    for (int t = 0; t < NT; t++) {
      tv[t] = _mm512_fmadd_ps(_mm512_add_ps(a0[t], a1[t]), sv, tv[t]);
      ts[t] += sc * tl[t] + L.offset_term(o, r, t0 + t);
    }
  }
  for (int t = 0; t < NT; t++) tot[t] = _mm512_reduce_add_ps(tv[t]) + ts[t];
}

template <typename CbT>
RowFn avx512_nt(int nt) {
  switch (nt) {
    case 1: return row_avx512_d2_small<CbT, 1>;
    case 2: return row_avx512_d2_small<CbT, 2>;
    case 3: return row_avx512_d2_small<CbT, 3>;
    default: return row_avx512_d2_small<CbT, 4>;
  }
}

// The AVX-512 kernel for a call, or NULL (then the AVX2 one).
template <typename CodeT>
RowFn avx512_for(int64_t d, int64_t K, int cb_dtype, int nt) {
  if (sizeof(CodeT) != 1 || d != 2 || K > 128 || cb_dtype == CB_F32) return nullptr;
  return cb_dtype == CB_F16 ? avx512_nt<Half>(nt) : avx512_nt<BF16>(nt);
}
#endif  // FASQ_X86

// The widest instruction set the kernels may use: 0 portable, 1 AVX2, 2 AVX-512 (capped by
// the CPU). FASQ_CPU_ISA=portable|avx2 caps it for a process, fasq_cpu_set_isa for later calls.
int g_isa_cap = -1;  // -1: not read yet

int isa_cap() {
  if (g_isa_cap < 0) {
    const char* e = getenv("FASQ_CPU_ISA");
    g_isa_cap = (e && strcmp(e, "portable") == 0) ? 0 : (e && strcmp(e, "avx2") == 0) ? 1 : 2;
  }
  return g_isa_cap;
}

// The instruction set the kernels use: 0 portable, 1 AVX2, 2 AVX-512.
int isa_level() {
#if FASQ_X86
  const int hw = cpu_has_avx512() ? 2 : cpu_has_avx2() ? 1 : 0;
  return std::min(hw, isa_cap());
#else
  return 0;
#endif
}

template <typename CodeT>
RowFn generic_for(int cb_dtype) {
  if (cb_dtype == CB_F16) return row_generic<CodeT, Half>;
  if (cb_dtype == CB_BF16) return row_generic<CodeT, BF16>;
  return row_generic<CodeT, float>;
}

template <typename CodeT>
RowFn pick(int64_t d, int64_t K, int cb_dtype, int nt) {
#if FASQ_X86
  const int level = isa_level();
  if (level >= 2)
    if (RowFn f = avx512_for<CodeT>(d, K, cb_dtype, nt)) return f;
  if (level >= 1)
    if (RowFn f = avx2_for<CodeT>(d, K, cb_dtype, nt)) return f;
#endif
  (void)d, (void)K, (void)nt;
  return generic_for<CodeT>(cb_dtype);
}

template <typename CodeT>
DequantFn pick_dequant_t(int64_t d, int64_t K, int cb_dtype) {
#if FASQ_X86
  if (isa_level() >= 1)
    if (DequantFn f = avx2_dequant_for<CodeT>(d, K, cb_dtype)) return f;
#endif
  (void)d, (void)K;
  if (cb_dtype == CB_F16) return dequant_generic<CodeT, Half>;
  if (cb_dtype == CB_BF16) return dequant_generic<CodeT, BF16>;
  return dequant_generic<CodeT, float>;
}

DequantFn pick_dequant(int code_bytes, int64_t d, int64_t K, int cb_dtype) {
  if (code_bytes == 1) return pick_dequant_t<uint8_t>(d, K, cb_dtype);
  if (code_bytes == 2) return pick_dequant_t<uint16_t>(d, K, cb_dtype);
  if (cb_dtype == CB_F16) return dequant_generic<int32_t, Half>;
  if (cb_dtype == CB_BF16) return dequant_generic<int32_t, BF16>;
  return dequant_generic<int32_t, float>;
}

RowFn pick_fn(int code_bytes, int64_t d, int64_t K, int cb_dtype, int nt) {
  if (code_bytes == 1) return pick<uint8_t>(d, K, cb_dtype, nt);
  if (code_bytes == 2) return pick<uint16_t>(d, K, cb_dtype, nt);
  return generic_for<int32_t>(cb_dtype);  // int32 codes (K = 65536): portable path only
}

int check_args(int64_t in, int64_t out, int code_bytes, int64_t C, int64_t K, int64_t d, int64_t S,
               const void* scales, const void* offsets, int cb_dtype, int scale_dtype) {
  if (in <= 0 || out <= 0 || d <= 0 || K <= 0 || C <= 0) return 1;
  if (in % d) return 2;
  const int64_t M = in / d;
  if (M % C) return 3;
  if (scales && (S <= 0 || M % S)) return 4;
  if (offsets && !scales) return 5;
  if (code_bytes != 1 && code_bytes != 2 && code_bytes != 4) return 6;
  if (cb_dtype < CB_F32 || cb_dtype > CB_BF16 || scale_dtype < CB_F32 || scale_dtype > CB_BF16) return 7;
  return 0;
}

int threads_for(int64_t weights, int nthreads) {
  return (nthreads > 1 && weights >= PARALLEL_MIN_WEIGHTS) ? nthreads : 1;
}




// The run, tile and activation-sum setup shared by both entry points.
struct Plan {
  std::vector<Run> runs;
  std::vector<size_t> tiles;
  Layer L;
  Plan(int64_t in, int64_t out, const void* codes, int code_bytes, const void* codebooks, int cb_dtype, int64_t C,
       int64_t K, int64_t d, const void* scales, const void* offsets, int scale_dtype, int64_t S) {
    const int64_t M = in / d, cb_bytes = K * d * elem_bytes(cb_dtype);
    runs = make_runs(M, M / C, scales ? M / S : M);
    tiles = make_tiles(runs, cb_bytes);
    L = Layer{nullptr, in, M, d, K, static_cast<const char*>(codes), code_bytes,
              static_cast<const char*>(codebooks), cb_bytes, scales, offsets, scale_dtype, S,
              runs.data(), nullptr, (int64_t)runs.size()};
  }
};

}  // namespace

extern "C" {

// Cap the instruction set of later calls (0 portable, 1 AVX2, 2 AVX-512 = no cap); returns
// the old cap.
int fasq_cpu_set_isa(int cap) {
  const int old = isa_cap();
  g_isa_cap = std::max(0, std::min(2, cap));
  return old;
}

// The instruction set the kernels use now: 0 portable, 1 AVX2, 2 AVX-512 (for kmeans_cpu.cpp).
int fasq_cpu_isa_level(void) { return isa_level(); }

// "avx512", "avx2" or "portable": the widest path the kernels take on this CPU now.
const char* fasq_cpu_isa(void) {
  const int level = isa_level();
  return level == 2 ? "avx512" : level == 1 ? "avx2" : "portable";
}

// y = x @ W.T + bias without building W.
// x [T, in] and y [T, out] have x_dtype; bias [out] has bias_dtype; codebooks cb_dtype;
// scales and offsets scale_dtype (dtype codes: 0 fp32, 1 fp16, 2 bf16). Returns 0, or a
// nonzero code for invalid arguments.
int fasq_cpu_pq_linear(const void* x, int x_dtype, int64_t T, int64_t in, int64_t out, const void* codes,
                       int code_bytes, const void* codebooks, int cb_dtype, int64_t C, int64_t K, int64_t d,
                       const void* scales, const void* offsets, int scale_dtype, int64_t S, const void* bias,
                       int bias_dtype, void* y, int nthreads) {
  if (int err = check_args(in, out, code_bytes, C, K, d, S, scales, offsets, cb_dtype, scale_dtype)) return err;
  if (x_dtype < CB_F32 || x_dtype > CB_BF16 || bias_dtype < CB_F32 || bias_dtype > CB_BF16) return 7;
  if (T <= 0) return 0;
  Plan plan(in, out, codes, code_bytes, codebooks, cb_dtype, C, K, d, scales, offsets, scale_dtype, S);
  Layer& L = plan.L;
  // fp32 activations (converted once), and their sums over each run for the offsets
  std::vector<float> xf;
  if (x_dtype == CB_F32) {
    L.x = static_cast<const float*>(x);
  } else {
    xf.resize(T * in);
    for (int64_t j = 0; j < T * in; j++) xf[j] = elem(x, j, x_dtype);
    L.x = xf.data();
  }
  std::vector<float> xsum;  // [T, R]
  if (offsets) {
    xsum.assign(T * L.R, 0.f);
    for (int64_t t = 0; t < T; t++)
      for (int64_t r = 0; r < L.R; r++) {
        const float* xp = L.x + t * in + plan.runs[r].m0 * d;
        float s = 0.f;
        for (int64_t j = 0; j < (plan.runs[r].m1 - plan.runs[r].m0) * d; j++) s += xp[j];
        xsum[t * L.R + r] = s;
      }
    L.xsum = xsum.data();
  }
  RowFn fns[MAX_NT + 1];
  for (int nt = 1; nt <= MAX_NT; nt++) fns[nt] = pick_fn(code_bytes, d, K, cb_dtype, nt);
  const std::vector<size_t>& tiles = plan.tiles;
  // fp32 sums: y itself when fp32, else a scratch [T, out] converted at the end
  std::vector<float> yscratch;
  float* yf = x_dtype == CB_F32 ? static_cast<float*>(y) : (yscratch.resize(T * out), yscratch.data());
  // With several column tiles, rows go in blocks so that a block's codes stay in cache
  // (and its pages in the TLB) while the tiles sweep over it.
  const int64_t row_block = tiles.size() > 1 ? ROW_BLOCK : out;
  const int nth = threads_for(out * in, nthreads);
#pragma omp parallel num_threads(nth) if (nth > 1)
  {
#ifdef _OPENMP
    const int tid = omp_get_thread_num(), nthr = omp_get_num_threads();
#else
    const int tid = 0, nthr = 1;
#endif
    const int64_t o0 = out * tid / nthr, o1 = out * (tid + 1) / nthr;
    alignas(64) float buf[GENERIC_CHUNK + 16];
    for (int64_t o = o0; o < o1; o++)
      for (int64_t t = 0; t < T; t++) yf[t * out + o] = bias ? elem(bias, o, bias_dtype) : 0.f;
    for (int64_t b0 = o0; b0 < o1; b0 += row_block) {
      const int64_t b1 = std::min(o1, b0 + row_block);
      for (size_t k = 0; k + 1 < tiles.size(); k++)
        for (int64_t o = b0; o < b1; o++)
          for (int64_t t0 = 0; t0 < T; t0 += MAX_NT) {
            const int nt = (int)std::min<int64_t>(MAX_NT, T - t0);
            float tot[MAX_NT];
            fns[nt](L, tiles[k], tiles[k + 1], o, t0, nt, tot, buf);
            for (int t = 0; t < nt; t++) yf[(t0 + t) * out + o] += tot[t];
          }
    }
    if (x_dtype != CB_F32)
      for (int64_t t = 0; t < T; t++)
        for (int64_t o = o0; o < o1; o++) store(y, t * out + o, yf[t * out + o], x_dtype);
  }
  return 0;
}

int fasq_cpu_pq_linear_args(const FasqLayerArgs* a, const void* x, int x_dtype, int64_t T, void* y, int nthreads) {
  return fasq_cpu_pq_linear(x, x_dtype, T, a->in, a->out, a->codes, (int)a->code_bytes, a->codebooks,
                            (int)a->cb_dtype, a->C, a->K, a->d, a->scales, a->offsets, (int)a->scale_dtype, a->S,
                            a->bias, (int)a->bias_dtype, y, nthreads);
}

// W[out, in] = codebook values * scales + offsets, written as w_dtype (0 fp32, 2 bf16).
int fasq_cpu_dequantize(const void* codes, int code_bytes, const void* codebooks, int cb_dtype, int64_t C,
                        int64_t K, int64_t d, const void* scales, const void* offsets, int scale_dtype,
                        int64_t S, int64_t out, int64_t in, void* W, int w_dtype, int nthreads) {
  if (int err = check_args(in, out, code_bytes, C, K, d, S, scales, offsets, cb_dtype, scale_dtype)) return err;
  if (w_dtype != CB_F32 && w_dtype != CB_BF16) return 7;
  Plan plan(in, out, codes, code_bytes, codebooks, cb_dtype, C, K, d, scales, offsets, scale_dtype, S);
  const DequantFn fn = pick_dequant(code_bytes, d, K, cb_dtype);
  const int64_t row_bytes = in * (w_dtype == CB_F32 ? 4 : 2);
  const int nth = threads_for(out * in, nthreads);
#pragma omp parallel for num_threads(nth) if (nth > 1) schedule(static)
  for (int64_t o = 0; o < out; o++) fn(plan.L, o, static_cast<char*>(W) + o * row_bytes, w_dtype);
  return 0;
}

int fasq_cpu_dequantize_args(const FasqLayerArgs* a, void* W, int w_dtype, int nthreads) {
  return fasq_cpu_dequantize(a->codes, (int)a->code_bytes, a->codebooks, (int)a->cb_dtype, a->C, a->K, a->d,
                             a->scales, a->offsets, (int)a->scale_dtype, a->S, a->out, a->in, W, w_dtype, nthreads);
}

}  // extern "C"
