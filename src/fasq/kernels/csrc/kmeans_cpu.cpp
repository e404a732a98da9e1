// k-means on the CPU for fasq/kmeans.py (Python side: fasq/kernels/cpu_kmeans.py).
//
// Built into the same library as pq_cpu.cpp (same C ABI, same OpenMP runtime, same run
// time choice of instruction set). Batched like the torch code: B independent problems.
//   points     fp32 [B, N, d]
//   centroids  fp32 [B, K, d]
//   codes      int64 [B, N]      nearest centroid (the first one on exact ties)
//   dist       fp32 [B, N]       its squared distance, or NULL
//
// Assignment is the whole cost of fasq's k-means (~90 % in torch, where the [N, K] score
// block of a d=2 problem is a memory-bound GEMM with an inner size of 2). Here the scores
// never leave registers: vectors run across centroids (cn + sum_j (-2 c_j) p_j, with the
// centroids transposed to [d, K]), several points share each centroid load, and each lane
// keeps its running minimum and index. One template serves AVX-512, AVX2 and portable C
// through GCC/Clang vector extensions, compiled once per instruction set.

#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASQ_KM_X86 1
#define FASQ_KM_AVX2 __attribute__((target("avx2,fma")))
#define FASQ_KM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))
#else
#define FASQ_KM_X86 0
#endif

extern "C" int fasq_cpu_isa_level(void);  // pq_cpu.cpp: 0 portable, 1 AVX2, 2 AVX-512

namespace {

constexpr int PTS = 4;  // points per pass: each centroid vector is loaded once for all of them

// The transposed centroids of one problem, padded to a multiple of 16 centroids:
// neg2[j * Kp + k] = -2 c[k, j], cn[k] = |c_k|^2 (+inf in the padding, never picked).
struct Cents {
  int64_t Kp;
  std::vector<float> neg2, cn;

  Cents(const float* c, int64_t K, int64_t d) : Kp((K + 15) / 16 * 16), neg2(d * Kp, 0.f),
      cn(Kp, std::numeric_limits<float>::infinity()) {
    for (int64_t k = 0; k < K; k++) {
      float s = 0.f;
      for (int64_t j = 0; j < d; j++) {
        s += c[k * d + j] * c[k * d + j];
        neg2[j * Kp + k] = -2.f * c[k * d + j];
      }
      cn[k] = s;
    }
  }
};

template <int V>
struct Vec {  // V lanes of fp32 / int32 (GCC/Clang vector extensions)
  typedef float f __attribute__((vector_size(V * 4)));
  typedef int32_t i __attribute__((vector_size(V * 4)));
};

// Nearest centroid of points p[0..np) ([np, d], np <= PTS). V lanes, D = d (0: run time).
template <int V, int D>
__attribute__((always_inline)) inline void nearest(const float* p, int np, int64_t d_rt, const Cents& c, int64_t* code, float* best_out) {
  typedef typename Vec<V>::f vf;
  typedef typename Vec<V>::i vi;
  const int64_t d = D ? D : d_rt;
  vi lane;
  for (int i = 0; i < V; i++) lane[i] = i;
  vf best[PTS];
  vi idx[PTS];
  for (int q = 0; q < PTS; q++) {
    best[q] = vf{} + std::numeric_limits<float>::infinity();
    idx[q] = vi{};
  }
  float pq[PTS][16];  // the points' coordinates (d <= 16), missing points repeat the first
  for (int q = 0; q < PTS; q++)
    for (int64_t j = 0; j < d; j++) pq[q][j] = p[(q < np ? q : 0) * d + j];
  for (int64_t k = 0; k < c.Kp; k += V) {
    vf s[PTS];
    vf cn;
    memcpy(&cn, &c.cn[k], sizeof(vf));
    for (int q = 0; q < PTS; q++) s[q] = cn;
    for (int64_t j = 0; j < d; j++) {
      vf m;
      memcpy(&m, &c.neg2[j * c.Kp + k], sizeof(vf));
      for (int q = 0; q < PTS; q++) s[q] += m * pq[q][j];
    }
    const vi ik = lane + (int32_t)k;
    for (int q = 0; q < PTS; q++) {
      const vi lt = s[q] < best[q];  // strict: a lane keeps its first minimum
      best[q] = lt ? s[q] : best[q];
      idx[q] = lt ? ik : idx[q];
    }
  }
  for (int q = 0; q < np; q++) {  // across lanes: the smallest score, then the smallest index
    float b = best[q][0];
    int32_t i = idx[q][0];
    for (int l = 1; l < V; l++)
      if (best[q][l] < b || (best[q][l] == b && idx[q][l] < i)) b = best[q][l], i = idx[q][l];
    code[q] = i;
    if (best_out) best_out[q] = b;
  }
}

typedef void (*NearestFn)(const float*, int, int64_t, const Cents&, int64_t*, float*);

template <int V>
NearestFn nearest_for(int64_t d) {
  switch (d) {
    case 1: return nearest<V, 1>;
    case 2: return nearest<V, 2>;
    case 4: return nearest<V, 4>;
    case 8: return nearest<V, 8>;
    default: return nearest<V, 0>;
  }
}

#if FASQ_KM_X86
template <int D>
FASQ_KM_AVX512 void nearest_avx512(const float* p, int np, int64_t d, const Cents& c, int64_t* code, float* b) {
  nearest<16, D>(p, np, d, c, code, b);
}
template <int D>
FASQ_KM_AVX2 void nearest_avx2(const float* p, int np, int64_t d, const Cents& c, int64_t* code, float* b) {
  nearest<8, D>(p, np, d, c, code, b);
}
NearestFn avx512_for(int64_t d) {
  switch (d) {
    case 1: return nearest_avx512<1>;
    case 2: return nearest_avx512<2>;
    case 4: return nearest_avx512<4>;
    case 8: return nearest_avx512<8>;
    default: return nearest_avx512<0>;
  }
}
NearestFn avx2_for(int64_t d) {
  switch (d) {
    case 1: return nearest_avx2<1>;
    case 2: return nearest_avx2<2>;
    case 4: return nearest_avx2<4>;
    case 8: return nearest_avx2<8>;
    default: return nearest_avx2<0>;
  }
}
#endif

NearestFn pick(int64_t d) {
#if FASQ_KM_X86
  const int level = fasq_cpu_isa_level();
  if (level >= 2) return avx512_for(d);
  if (level >= 1) return avx2_for(d);
#endif
  return nearest_for<4>(d);
}

}  // namespace

extern "C" {

// codes[b, n] = argmin_k |points[b, n] - centroids[b, k]|^2; dist (if not NULL) = that minimum.
// Returns 0, or 1 for invalid sizes.
int fasq_cpu_kmeans_assign(const float* points, const float* centroids, int64_t B, int64_t N, int64_t K,
                           int64_t d, int64_t* codes, float* dist, int nthreads) {
  if (B <= 0 || N <= 0 || K <= 0 || d <= 0 || d > 16 || K > (int64_t)1 << 30) return 1;
  std::vector<Cents> cents;
  cents.reserve(B);
  for (int64_t b = 0; b < B; b++) cents.emplace_back(centroids + b * K * d, K, d);
  const NearestFn fn = pick(d);
  const int64_t blocks = (N + PTS - 1) / PTS;  // per problem
  const int nth = (nthreads > 1 && B * N * K >= (1 << 16)) ? nthreads : 1;
#pragma omp parallel for num_threads(nth) if (nth > 1) schedule(static)
  for (int64_t t = 0; t < B * blocks; t++) {
    const int64_t b = t / blocks, n0 = (t % blocks) * PTS;
    const int np = (int)std::min<int64_t>(PTS, N - n0);
    const float* p = points + (b * N + n0) * d;
    float best[PTS];
    fn(p, np, d, cents[b], codes + b * N + n0, best);
    if (dist)
      for (int q = 0; q < np; q++) {
        float pp = 0.f;  // |p|^2 + (|c|^2 - 2 p.c), clamped at 0 against rounding
        for (int64_t j = 0; j < d; j++) pp += p[q * d + j] * p[q * d + j];
        dist[b * N + n0 + q] = std::max(0.f, best[q] + pp);
      }
  }
  return 0;
}

// k-means++ (D^2 sampling) seeding: centroids[b] from points[b] ([B, N, d] -> [B, K, d]).
// first[b] is the first centroid's point index; u[b, k] (k = 1..K-1) are uniforms in
// [0, 1) that pick the others, with probability proportional to the squared distance to
// the nearest centroid chosen so far (uniform when every distance is 0). Sums in double.
int fasq_cpu_kmeanspp(const float* points, int64_t B, int64_t N, int64_t K, int64_t d, const int64_t* first,
                      const double* u, float* centroids, int nthreads) {
  if (B <= 0 || N <= 0 || K <= 0 || d <= 0) return 1;
  const int nth = (nthreads > 1 && B > 1 && N * K >= (1 << 14)) ? nthreads : 1;
#pragma omp parallel for num_threads(nth) if (nth > 1) schedule(dynamic, 1)
  for (int64_t b = 0; b < B; b++) {
    const float* P = points + b * N * d;
    float* C = centroids + b * K * d;
    std::vector<double> mind(N);
    auto take = [&](int64_t k, int64_t i) {
      memcpy(C + k * d, P + i * d, d * sizeof(float));
      for (int64_t n = 0; n < N; n++) {
        double s = 0;
        for (int64_t j = 0; j < d; j++) {
          const double t = (double)P[n * d + j] - C[k * d + j];
          s += t * t;
        }
        mind[n] = k == 0 ? s : std::min(mind[n], s);
      }
    };
    take(0, std::min(std::max<int64_t>(first[b], 0), N - 1));
    for (int64_t k = 1; k < K; k++) {
      double total = 0;
      for (int64_t n = 0; n < N; n++) total += mind[n];
      const bool flat = total <= 0;  // every point sits on a centroid: pick uniformly
      const double target = u[b * K + k] * (flat ? (double)N : total);
      double acc = 0;
      int64_t pick = N - 1;
      for (int64_t n = 0; n < N; n++) {
        acc += flat ? 1.0 : mind[n];
        if (acc > target) {
          pick = n;
          break;
        }
      }
      take(k, pick);
    }
  }
  return 0;
}

}  // extern "C"
