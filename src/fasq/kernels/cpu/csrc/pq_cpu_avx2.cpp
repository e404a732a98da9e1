// The AVX2 + FMA kernels of the fasq CPU library: centroids gathered straight into
// registers, FMAs against the activations (decode), and the W rebuild for prefill.

#include "pq_cpu_kernels.h"

#if FASQ_X86
namespace fasq_cpu {
namespace {

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




}  // namespace

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
}

template <typename CodeT>
DequantFn avx2_dequant_for(int64_t d, int64_t K, int cb_dtype) {
  if (d == 1 && K <= 16) return dequant_cb<1, CodeT>(cb_dtype);
  if (d == 2) return dequant_cb<2, CodeT>(cb_dtype);
  if (d == 4) return dequant_cb<4, CodeT>(cb_dtype);
  if (d == 8) return dequant_cb<8, CodeT>(cb_dtype);
  return nullptr;
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

template RowFn avx2_for<uint8_t>(int64_t, int64_t, int, int);
template RowFn avx2_for<uint16_t>(int64_t, int64_t, int, int);
template DequantFn avx2_dequant_for<uint8_t>(int64_t, int64_t, int);
template DequantFn avx2_dequant_for<uint16_t>(int64_t, int64_t, int);

}  // namespace fasq_cpu
#endif  // FASQ_X86
