// fasq CPU decode of the layers a checkpoint keeps dense in bf16 (by default the output
// head: for SmolLM2's vocabulary 49152 x hidden, the largest matrix of a small model, and a
// third of a 1B model's bytes per token beside 4-bit codes). The Python side is
// fasq/kernels/cpu/dense.py (op fasq::dense_linear).
//
// y[T, out] = x[T, in] @ W.T (+ bias): W [out, in] as stored (row-major bf16), x, y and bias
// bf16, fp32 sums, by AVX-512 BF16 dot products (vdpbf16ps: 32 products per 64-byte load,
// each exact in fp32). Why: at a few tokens the work is one pass over W, and torch's bf16
// matmul reads it at about 25 GB/s on a CPU whose memory gives 50-90 (AMD EPYC Zen 4, 2
// threads, 49152 x 2048: 8.5 ms against 3.0 ms here); it stays the path for prefill.
//
// Rows go R at a time (four rows: one load each, per token one vdpbf16ps each per 32
// columns); tokens NT at a time over the same rows, which stay in L1 for the next NT.
// Columns past the last multiple of 32 are read with masked loads (zeros beyond in).

#include "pq_cpu_kernels.h"

using fasq_cpu::float_to_bf16;
using fasq_cpu::bf16_to_float;

// Compilers older than GCC 10 / clang 9 lack the avx512bf16 target: then the kernel is left
// out (fasq_cpu_bf16_available says 0) rather than failing the whole library's build.
#if FASQ_X86 && (defined(__clang__) ? __clang_major__ >= 9 : __GNUC__ >= 10)
#define FASQ_HAVE_BF16 1
#else
#define FASQ_HAVE_BF16 0
#endif

#if FASQ_HAVE_BF16
#define FASQ_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

namespace {

constexpr int R = 4;   // rows per block
constexpr int NT = 4;  // tokens per pass over a block (R * NT accumulators)

bool cpu_has_bf16() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return has;
}

// [sum of a, sum of b, sum of c, sum of d]: four rows' sums at once (one horizontal sum each
// would cost about as much as a 576-column row's dot products)
FASQ_BF16 inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  // per 128 bits: a02 b02 a13 b13
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512 q = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE));  // a b c d
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(q),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(q), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// s[t * ROWS + r] = sum over columns of W[r, :] * x[t, :] for ROWS rows from w and NTOK
// tokens from x (row strides `in`).
template <int ROWS, int NTOK>
FASQ_BF16 void dot_block(const uint16_t* w, const uint16_t* x, int64_t in, float* s) {
  __m512 acc[NTOK][ROWS];
  for (int t = 0; t < NTOK; t++)
    for (int r = 0; r < ROWS; r++) acc[t][r] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 32 <= in; c += 32) {
    __m512i xv[NTOK];
    for (int t = 0; t < NTOK; t++) xv[t] = _mm512_loadu_si512(x + t * in + c);
    for (int r = 0; r < ROWS; r++) {
      const __m512i wv = _mm512_loadu_si512(w + r * in + c);
      for (int t = 0; t < NTOK; t++) acc[t][r] = _mm512_dpbf16_ps(acc[t][r], (__m512bh)wv, (__m512bh)xv[t]);
    }
  }
  if (c < in) {  // the last in % 32 columns; masked-off lanes load zeros
    const __mmask32 m = (__mmask32)((1ull << (in - c)) - 1);
    __m512i xv[NTOK];
    for (int t = 0; t < NTOK; t++) xv[t] = _mm512_maskz_loadu_epi16(m, x + t * in + c);
    for (int r = 0; r < ROWS; r++) {
      const __m512i wv = _mm512_maskz_loadu_epi16(m, w + r * in + c);
      for (int t = 0; t < NTOK; t++) acc[t][r] = _mm512_dpbf16_ps(acc[t][r], (__m512bh)wv, (__m512bh)xv[t]);
    }
  }
  for (int t = 0; t < NTOK; t++) {
    if constexpr (ROWS == 4) {
      _mm_storeu_ps(s + t * 4, sum4(acc[t][0], acc[t][1], acc[t][2], acc[t][3]));
    } else {
      for (int r = 0; r < ROWS; r++) s[t * ROWS + r] = _mm512_reduce_add_ps(acc[t][r]);
    }
  }
}

using DotFn = void (*)(const uint16_t*, const uint16_t*, int64_t, float*);

template <int ROWS>
DotFn pick(int ntok) {
  switch (ntok) {
    case 1: return dot_block<ROWS, 1>;
    case 2: return dot_block<ROWS, 2>;
    case 3: return dot_block<ROWS, 3>;
    default: return dot_block<ROWS, 4>;
  }
}

// Rows [o, o + rows) of y for every token: rows == R, or fewer (the last block), one at a time.
void row_block(const uint16_t* W, int64_t out, int64_t in, const uint16_t* bias, const uint16_t* x, int64_t T,
               uint16_t* y, int64_t o) {
  const int rows = (int)std::min<int64_t>(R, out - o);
  const int nr = rows == R ? R : 1;  // rows per dot_block call
  alignas(64) float s[NT * R];
  for (int64_t t0 = 0; t0 < T; t0 += NT) {
    const int nt = (int)std::min<int64_t>(NT, T - t0);
    const DotFn dot = nr == R ? pick<R>(nt) : pick<1>(nt);
    for (int r0 = 0; r0 < rows; r0 += nr) {
      dot(W + (o + r0) * in, x + t0 * in, in, s);
      for (int t = 0; t < nt; t++)
        for (int r = 0; r < nr; r++) {
          const float b = bias ? bf16_to_float(bias[o + r0 + r]) : 0.f;
          y[(t0 + t) * out + o + r0 + r] = float_to_bf16(s[t * nr + r] + b);
        }
    }
  }
}

}  // namespace
#endif

extern "C" {

// Whether this CPU runs fasq_cpu_bf16_linear (AVX-512 BF16) and the instruction-set cap
// (FASQ_CPU_ISA / cpu.limit_isa) allows AVX-512.
int fasq_cpu_bf16_available(void) {
#if FASQ_HAVE_BF16
  return cpu_has_bf16() && fasq_cpu_isa_level() >= 2 ? 1 : 0;
#else
  return 0;
#endif
}

// y[T, out] = x[T, in] @ W.T + bias; W [out, in], x [T, in], y [T, out], bias [out] or NULL,
// all bf16 and contiguous. Returns 0; 1 for a non-positive size; 3 when this CPU (or the cap)
// lacks the path.
int fasq_cpu_bf16_linear(const uint16_t* W, int64_t out, int64_t in, const uint16_t* bias, const uint16_t* x,
                         int64_t T, uint16_t* y, int nthreads) {
  if (out <= 0 || in <= 0 || T < 0) return 1;
  if (!fasq_cpu_bf16_available()) return 3;
#if FASQ_HAVE_BF16
  const int64_t blocks = (out + R - 1) / R;
  const int nth = fasq_cpu::threads_for(out * in, nthreads);
#pragma omp parallel for num_threads(nth) if (nth > 1) schedule(static)
  for (int64_t b = 0; b < blocks; b++) row_block(W, out, in, bias, x, T, y, b * R);
  return 0;
#else
  (void)W, (void)bias, (void)x, (void)y, (void)nthreads;
  return 3;
#endif
}

}  // extern "C"
