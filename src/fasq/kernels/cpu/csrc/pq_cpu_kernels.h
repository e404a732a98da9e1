// Internal to the exact kernels of the fasq CPU library (pq_cpu.cpp, pq_cpu_avx2.cpp,
// pq_cpu_avx512.cpp; the C ABI is in pq_cpu.h): the layer a call describes, dtype helpers,
// the row and dequantize kernel types, and what each instruction set's file provides.
#pragma once

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

namespace fasq_cpu {


constexpr int MAX_NT = 4;                  // tokens per pass (register-resident accumulators)
// Codebook bytes one column tile may touch: an L2's share (a 32 KB L1 cannot hold even one
// fp16 d=4 K=4096 codebook, so tiling for L1 only breaks the row-major code stream).
constexpr int64_t CODEBOOK_BUDGET = 256 << 10;
constexpr int64_t GENERIC_CHUNK = 512;     // floats decoded at once by the portable path
constexpr int64_t PARALLEL_MIN_WEIGHTS = 1 << 16;  // smaller layers run on one thread
constexpr int64_t ROW_BLOCK = 64;          // rows per block when codebooks come in several tiles

// Threads for a call over `weights` weights: the caller's count, or one for small layers
// (every kernel of the library: exact, int8 and dense bf16).
inline int threads_for(int64_t weights, int nthreads) {
  return (nthreads > 1 && weights >= PARALLEL_MIN_WEIGHTS) ? nthreads : 1;
}

struct Run {  // subspaces [m0, m1) of a row, all in codebook c and scale group g
  int64_t m0, m1, c, g;
};

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

// A dequantize kernel: row o of W (runs [0, R)) into `w` as fp32 or bf16 (w_dtype).
typedef void (*DequantFn)(const Layer& L, int64_t o, void* w, int w_dtype);

#if FASQ_X86
// pq_cpu_avx2.cpp: the AVX2 + FMA kernels, or NULL where the portable path serves.
bool cpu_has_avx2();
template <typename CodeT> RowFn avx2_for(int64_t d, int64_t K, int cb_dtype, int nt);
template <typename CodeT> DequantFn avx2_dequant_for(int64_t d, int64_t K, int cb_dtype);
// pq_cpu_avx512.cpp: the AVX-512 kernels (small codebooks in registers), or NULL.
bool cpu_has_avx512();
template <typename CodeT> RowFn avx512_for(int64_t d, int64_t K, int cb_dtype, int nt);
#endif

}  // namespace fasq_cpu
