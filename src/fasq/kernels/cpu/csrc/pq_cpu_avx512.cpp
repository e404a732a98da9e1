// The AVX-512 kernels of the fasq CPU library: small codebooks (d=2, K <= 128, 16-bit)
// held in registers and looked up with permutes instead of loads.

#include "pq_cpu_kernels.h"

#if FASQ_X86
namespace fasq_cpu {
namespace {

// --- AVX-512: small codebooks looked up in registers ---------------------------------------


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


}  // namespace

bool cpu_has_avx512() {
  static const bool has = cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return has;
}

// The AVX-512 kernel for a call, or NULL (then the AVX2 one).
template <typename CodeT>
RowFn avx512_for(int64_t d, int64_t K, int cb_dtype, int nt) {
  if (sizeof(CodeT) != 1 || d != 2 || K > 128 || cb_dtype == CB_F32) return nullptr;
  return cb_dtype == CB_F16 ? avx512_nt<Half>(nt) : avx512_nt<BF16>(nt);
}

template RowFn avx512_for<uint8_t>(int64_t, int64_t, int, int);
template RowFn avx512_for<uint16_t>(int64_t, int64_t, int, int);

}  // namespace fasq_cpu
#endif  // FASQ_X86
