// Microbenchmark: decode GEMV for d=2 codebooks through int8 lookups (AVX-512 VBMI + VNNI),
// against the read and copy bandwidth of the same machine. Standalone (no fasq headers);
// driven by benchmarks/probe_int8.py, which compiles it and records the JSON lines it prints.
//
// Layout (what the library's load-time preparation makes):
//   codes   [out/16][M/4][16 rows][4 codes]  64 bytes per step: 16 rows x 4 subspaces
//   tables  [C][2][256] uint8                 first / second element of each centroid,
//                                             int8 + 128 (unsigned for vpdpbusd)
//   xq      [T][M/4][8] int8                  per step: x[2m..] even columns, then odd ones
//   xs, xq_sum [T][blocks]                    per activation block (ABLK subspaces): scale and
//                                             sum of the int8 values (for the +128 shift)
// Per step: one 64-byte load, 256-entry lookups as 2 vpermi2b + a blend on the code's top
// bit (mask from vpmovb2m) for each of the two tables, then per token two vpdpbusd against
// broadcast 4-byte activation groups. Per activation block one int->float and one FMA per
// token; per run (codebook x scale group) one FMA with the 16 rows' scales.
//
// Usage: probe out in K tokens copies reps ablk
// Prints one JSON line per measurement.

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <algorithm>
#include <vector>

static double now() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

struct Layer {
  uint8_t* codes;
  float* scales;  // [out/16][S][16]
};

struct Shape {
  int64_t out, in, M, K, C, S, span, gsub, ablk;
};

// One row block (16 rows), NT tokens. tot: [NT][16] written.
template <int NT, bool BIG>
static void row_block(const Shape& s, const Layer& L, const uint8_t* tabs, const float* cbscale, int64_t rb,
                      const int8_t* xq, const float* xs, const int32_t* xqs, int64_t nblk, float* tot) {
  constexpr int U = NT >= 4 ? 1 : 2;  // independent accumulator sets (hide the vpdpbusd latency)
  const int64_t M4 = s.M / 4;
  const __m512i* code = reinterpret_cast<const __m512i*>(L.codes) + rb * M4;
  __m512 tv[NT];
  for (int t = 0; t < NT; t++) tv[t] = _mm512_setzero_ps();
  __m512i ta0, ta1, ta2, ta3, tb0, tb1, tb2, tb3;
  int64_t loaded = -1;
  for (int64_t m0 = 0; m0 < s.M;) {
    const int64_t c = m0 / s.span, g = m0 / s.gsub;
    const int64_t m1 = std::min((c + 1) * s.span, (g + 1) * s.gsub);
    if (c != loaded) {
      const __m512i* tp = reinterpret_cast<const __m512i*>(tabs + c * 512);
      ta0 = _mm512_loadu_si512(tp), ta1 = _mm512_loadu_si512(tp + 1);
      ta2 = _mm512_loadu_si512(tp + 2), ta3 = _mm512_loadu_si512(tp + 3);
      tb0 = _mm512_loadu_si512(tp + 4), tb1 = _mm512_loadu_si512(tp + 5);
      tb2 = _mm512_loadu_si512(tp + 6), tb3 = _mm512_loadu_si512(tp + 7);
      loaded = c;
    }
    __m512 racc[NT];
    for (int t = 0; t < NT; t++) racc[t] = _mm512_setzero_ps();
    for (int64_t b0 = m0; b0 < m1; b0 += s.ablk) {
      const int64_t b1 = std::min(m1, b0 + s.ablk), blk = b0 / s.ablk;
      __m512i acc[U][NT];
      for (int t = 0; t < NT; t++) {
        acc[0][t] = _mm512_set1_epi32(-128 * xqs[t * nblk + blk]);
        if (U > 1) acc[1][t] = _mm512_setzero_si512();
      }
      for (int64_t m = b0; m < b1; m += 4 * U) {
        for (int u = 0; u < U; u++) {
          if (U > 1 && m + 4 * u >= b1) break;
          const __m512i idx = _mm512_loadu_si512(code + (m / 4 + u));
          __m512i wa = _mm512_permutex2var_epi8(ta0, idx, ta1), wb = _mm512_permutex2var_epi8(tb0, idx, tb1);
          if (BIG) {
            const __mmask64 hi = _mm512_movepi8_mask(idx);
            wa = _mm512_mask_blend_epi8(hi, wa, _mm512_permutex2var_epi8(ta2, idx, ta3));
            wb = _mm512_mask_blend_epi8(hi, wb, _mm512_permutex2var_epi8(tb2, idx, tb3));
          }
          for (int t = 0; t < NT; t++) {
            const int32_t* xp = reinterpret_cast<const int32_t*>(xq + (t * M4 + m / 4 + u) * 8);
            acc[u][t] = _mm512_dpbusd_epi32(acc[u][t], wa, _mm512_set1_epi32(xp[0]));
            acc[u][t] = _mm512_dpbusd_epi32(acc[u][t], wb, _mm512_set1_epi32(xp[1]));
          }
        }
      }
      for (int t = 0; t < NT; t++) {
        __m512i a = U > 1 ? _mm512_add_epi32(acc[0][t], acc[1][t]) : acc[0][t];
        racc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_set1_ps(xs[t * nblk + blk]), racc[t]);
      }
    }
    const __m512 sv = _mm512_mul_ps(_mm512_loadu_ps(L.scales + (rb * s.S + g) * 16), _mm512_set1_ps(cbscale[c]));
    for (int t = 0; t < NT; t++) tv[t] = _mm512_fmadd_ps(racc[t], sv, tv[t]);
    m0 = m1;
  }
  for (int t = 0; t < NT; t++) _mm512_storeu_ps(tot + t * 16, tv[t]);
}

typedef void (*BlockFn)(const Shape&, const Layer&, const uint8_t*, const float*, int64_t, const int8_t*,
                        const float*, const int32_t*, int64_t, float*);

template <bool BIG>
static BlockFn pick(int nt) {
  switch (nt) {
    case 1: return row_block<1, BIG>;
    case 2: return row_block<2, BIG>;
    case 3: return row_block<3, BIG>;
    case 4: return row_block<4, BIG>;
    case 5: return row_block<5, BIG>;
    case 6: return row_block<6, BIG>;
    case 7: return row_block<7, BIG>;
    default: return row_block<8, BIG>;
  }
}

static void gemv(const Shape& s, const Layer& L, const uint8_t* tabs, const float* cbscale, int T,
                 const int8_t* xq, const float* xs, const int32_t* xqs, int64_t nblk, float* y) {
#pragma omp parallel
  {
    alignas(64) float tot[8 * 16];
#pragma omp for schedule(static)
    for (int64_t rb = 0; rb < s.out / 16; rb++)
      for (int t0 = 0; t0 < T; t0 += 8) {
        const int nt = std::min(8, T - t0);
        const BlockFn fn = s.K > 128 ? pick<true>(nt) : pick<false>(nt);
        fn(s, L, tabs, cbscale, rb, xq + (int64_t)t0 * (s.M / 4) * 8, xs + t0 * nblk, xqs + t0 * nblk, nblk, tot);
        for (int t = 0; t < nt; t++)
          for (int r = 0; r < 16; r++) y[(int64_t)(t0 + t) * s.out + rb * 16 + r] = tot[t * 16 + r];
      }
  }
}

// Bandwidth: bytes read per second (sum of 64-bit words), and memcpy (2x bytes moved).
static double read_gbps(const std::vector<uint8_t*>& bufs, int64_t n, int reps) {
  double best = 1e30;
  volatile int64_t sink = 0;
  for (int r = 0; r < reps; r++) {
    const double t0 = now();
    for (uint8_t* b : bufs) {
      int64_t total = 0;
#pragma omp parallel for reduction(+ : total) schedule(static)
      for (int64_t i = 0; i < n; i += 256) {
        __m512i v = _mm512_xor_si512(_mm512_load_si512(b + i), _mm512_load_si512(b + i + 64));
        v = _mm512_xor_si512(v, _mm512_xor_si512(_mm512_load_si512(b + i + 128), _mm512_load_si512(b + i + 192)));
        total += _mm512_reduce_add_epi64(v);
      }
      sink += total;
    }
    best = std::min(best, now() - t0);
  }
  return (double)n * bufs.size() / best / 1e9;
}

static double copy_gbps(int64_t n, int reps) {
  uint8_t* a = static_cast<uint8_t*>(aligned_alloc(64, n));
  uint8_t* b = static_cast<uint8_t*>(aligned_alloc(64, n));
  memset(a, 1, n), memset(b, 2, n);
  double best = 1e30;
  for (int r = 0; r < reps; r++) {
    const double t0 = now();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i += 1 << 20) memcpy(b + i, a + i, std::min<int64_t>(1 << 20, n - i));
    best = std::min(best, now() - t0);
  }
  free(a), free(b);
  return 2.0 * n / best / 1e9;
}

int main(int argc, char** argv) {
  if (argc < 8) {
    fprintf(stderr, "usage: %s out in K tokens copies reps ablk\n", argv[0]);
    return 2;
  }
  Shape s;
  s.out = atoll(argv[1]), s.in = atoll(argv[2]), s.K = atoll(argv[3]);
  const int T = atoi(argv[4]), copies = atoi(argv[5]), reps = atoi(argv[6]);
  s.ablk = atoll(argv[7]);
  s.M = s.in / 2;
  // the default scope: a codebook per >= 96 subspaces, a scale per >= 96 columns
  s.span = s.M;
  for (int64_t v = 96; v <= s.M; v++)
    if (s.M % v == 0) { s.span = v; break; }
  s.gsub = s.M;
  for (int64_t v = 48; v <= s.M; v++)
    if (s.M % v == 0 && v % 4 == 0) { s.gsub = v; break; }
  s.C = s.M / s.span, s.S = s.M / s.gsub;
  const int64_t nblk = (s.M + s.ablk - 1) / s.ablk, code_bytes = s.out * s.M;
  srand(1);
  std::vector<Layer> layers(copies);
  uint64_t state = 88172645463325252ull;  // xorshift64: random codes, fast enough for a GB
  for (Layer& L : layers) {
    L.codes = static_cast<uint8_t*>(aligned_alloc(64, code_bytes));
    for (int64_t i = 0; i < code_bytes; i += 8) {
      state ^= state << 13, state ^= state >> 7, state ^= state << 17;
      uint64_t v = state & (0x0101010101010101ull * (uint64_t)(s.K - 1));
      memcpy(L.codes + i, &v, 8);
    }
    L.scales = static_cast<float*>(aligned_alloc(64, s.out * s.S * 4));
    for (int64_t i = 0; i < s.out * s.S; i++) L.scales[i] = 0.5f + (rand() % 100) / 100.f;
  }
  std::vector<uint8_t> tabs(s.C * 512);
  for (auto& v : tabs) v = (uint8_t)(rand() % 255 + 1);
  std::vector<float> cbscale(s.C, 0.01f), xs(T * nblk, 0.02f), y(T * s.out);
  std::vector<int8_t> xq(T * s.M * 2);
  for (auto& v : xq) v = (int8_t)(rand() % 255 - 127);
  std::vector<int32_t> xqs(T * nblk, 0);
  for (int t = 0; t < T; t++)
    for (int64_t m = 0; m < s.M; m++) xqs[t * nblk + m / s.ablk] += xq[t * s.M * 2 + 2 * m] + xq[t * s.M * 2 + 2 * m + 1];
  for (int w = 0; w < 2; w++)
    for (Layer& L : layers) gemv(s, L, tabs.data(), cbscale.data(), T, xq.data(), xs.data(), xqs.data(), nblk, y.data());
  std::vector<double> times;
  for (int r = 0; r < reps; r++) {
    const double t0 = now();
    for (Layer& L : layers) gemv(s, L, tabs.data(), cbscale.data(), T, xq.data(), xs.data(), xqs.data(), nblk, y.data());
    times.push_back((now() - t0) / copies);
  }
  std::sort(times.begin(), times.end());
  std::vector<uint8_t*> bufs;
  for (Layer& L : layers) bufs.push_back(L.codes);
  const double rd = read_gbps(bufs, code_bytes, std::max(3, reps / 3));
  const double us_min = times[0] * 1e6, us_med = times[times.size() / 2] * 1e6;
  printf("{\"out\": %lld, \"in\": %lld, \"K\": %lld, \"tokens\": %d, \"copies\": %d, \"ablk_subspaces\": %lld, "
         "\"threads\": %d, \"code_bytes\": %lld, \"rotated_bytes\": %lld, \"us_min\": %.1f, \"us_median\": %.1f, "
         "\"codes_gbps\": %.1f, \"read_gbps_same_buffers\": %.1f, \"gcodes_s\": %.1f, \"check\": %.4g}\n",
         (long long)s.out, (long long)s.in, (long long)s.K, T, copies, (long long)s.ablk, omp_get_max_threads(),
         (long long)code_bytes, (long long)code_bytes * copies, us_min, us_med, code_bytes / times[0] / 1e9, rd,
         code_bytes / times[0] / 1e9, (double)y[0]);
  if (getenv("PROBE_COPY_BYTES")) {
    const int64_t n = atoll(getenv("PROBE_COPY_BYTES"));
    printf("{\"copy_bytes\": %lld, \"copy_gbps\": %.1f, \"threads\": %d}\n", (long long)n, copy_gbps(n, 5),
           omp_get_max_threads());
  }
  return 0;
}
