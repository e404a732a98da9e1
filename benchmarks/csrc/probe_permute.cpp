// Throughput of the instructions the int8 decode kernel is built from (pq_cpu_int8.cpp):
// 8 independent chains of one instruction per loop, timed by the wall clock; prints one
// JSON line per instruction {"instr", "ns"}: nanoseconds per instruction on one core.
// Why: on the Intel core of our machine a vpermi2b (128-entry table) costs twice a vpermb
// (64-entry table), so a K <= 64 codebook is looked up by vpermb.
//
//   c++ -O2 -march=native benchmarks/csrc/probe_permute.cpp -o probe_permute && ./probe_permute
// (benchmarks/probe_int8.py --instructions does this and records the result)
#include <immintrin.h>
#include <stdio.h>

#include <chrono>

#define T8(OP) a = OP(a), b = OP(b), c = OP(c), d = OP(d), e = OP(e), f = OP(f), g = OP(g), h = OP(h)

typedef __m512i (*Loop)(long, __m512i, __m512i);

#define LOOP(NAME, EXPR)                                                                            \
  __attribute__((noinline)) __m512i NAME(long n, __m512i t0, __m512i t1) {                         \
    __m512i a = t0, b = t1, c = _mm512_add_epi8(t0, t1), d = _mm512_sub_epi8(t0, t1),               \
            e = _mm512_xor_si512(t0, t1), f = _mm512_or_si512(t0, t1), g = _mm512_and_si512(t0, t1), \
            h = _mm512_andnot_si512(t0, t1);                                                        \
    for (long k = 0; k < n; k++) {                                                                  \
      T8(EXPR);                                                                                     \
    }                                                                                               \
    return _mm512_add_epi8(_mm512_add_epi8(_mm512_add_epi8(a, b), _mm512_add_epi8(c, d)),          \
                           _mm512_add_epi8(_mm512_add_epi8(e, f), _mm512_add_epi8(g, h)));          \
  }

#define VPERMB(x) _mm512_permutexvar_epi8(x, t0)
#define VPERMI2B(x) _mm512_permutex2var_epi8(t0, x, t1)
#define VPDPBUSD(x) _mm512_dpbusd_epi32(x, t0, t1)
#define VPBLENDMB(x) _mm512_mask_blend_epi8(_mm512_movepi8_mask(t0), x, t1)
#define VCVTDQ2PS(x) _mm512_castps_si512(_mm512_cvtepi32_ps(x))
LOOP(loop_vpermb, VPERMB)
LOOP(loop_vpermi2b, VPERMI2B)
LOOP(loop_vpdpbusd, VPDPBUSD)
LOOP(loop_vpblendmb, VPBLENDMB)
LOOP(loop_vcvtdq2ps, VCVTDQ2PS)

int main() {
  const struct { const char* name; Loop fn; } loops[] = {{"vpermb", loop_vpermb}, {"vpermi2b", loop_vpermi2b},
                                                         {"vpdpbusd", loop_vpdpbusd}, {"vpblendmb", loop_vpblendmb},
                                                         {"vcvtdq2ps", loop_vcvtdq2ps}};
  const long n = 20000000;
  volatile int sink = 0;
  for (const auto& l : loops) {
    double best = 1e30;
    for (int rep = 0; rep < 3; rep++) {
      const auto w0 = std::chrono::steady_clock::now();
      const __m512i r = l.fn(n, _mm512_set1_epi8(3), _mm512_set1_epi8(5));
      const auto w1 = std::chrono::steady_clock::now();
      sink += _mm_cvtsi128_si32(_mm512_castsi512_si128(r));
      const double ns = std::chrono::duration<double, std::nano>(w1 - w0).count() / (8.0 * n);
      best = ns < best ? ns : best;
    }
    printf("{\"instr\": \"%s\", \"ns\": %.4f}\n", l.name, best);
  }
  return sink == 12345 ? 1 : 0;
}
