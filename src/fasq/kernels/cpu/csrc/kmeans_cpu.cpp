// k-means on the CPU for fasq/quant/kmeans.py (Python side: fasq/kernels/cpu/kmeans.py).
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
// never leave registers: vectors run across points (a lane per point), the loop across
// centroids (score cn + sum_j (-2 c_j) p_j, each centroid's values broadcast once for 32
// or 64 points), and each lane keeps its running minimum and index: no reduction across
// lanes. One template serves AVX-512, AVX2 and portable C
// through GCC/Clang vector extensions, compiled once per instruction set.

#include <stdint.h>
#include <string.h>

#include <algorithm>
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

template <int V>
struct Vec {  // V lanes of fp32 / int32 (GCC/Clang vector extensions)
  typedef float f __attribute__((vector_size(V * 4)));
  typedef int32_t i __attribute__((vector_size(V * 4)));
};

// One problem's centroids as the scores need them: neg2[k * d + j] = -2 c[k, j] and
// cn[k] = |c_k|^2 (score = cn[k] + sum_j neg2[k, j] p_j = |p - c_k|^2 - |p|^2).
struct Cents {
  int64_t K;
  std::vector<float> neg2, cn;

  Cents(const float* c, int64_t K_, int64_t d) : K(K_), neg2(K_ * d), cn(K_) {
    for (int64_t k = 0; k < K; k++) {
      float s = 0.f;
      for (int64_t j = 0; j < d; j++) {
        s += c[k * d + j] * c[k * d + j];
        neg2[k * d + j] = -2.f * c[k * d + j];
      }
      cn[k] = s;
    }
  }
};

// Point vectors per pass (each centroid's broadcasts serve all of them): 4 with AVX-512's
// 32 registers, 2 with AVX2's 16.
template <int V>
constexpr int rows_for() { return V >= 16 ? 4 : 2; }
constexpr int MAX_PTS = 64;  // the most points one call takes (AVX-512: 4 x 16)

// Nearest centroid of points p[0..np) ([np, d], np <= rows_for<V>() * V): lanes run across points,
// the loop across centroids, so no reduction across lanes is needed; a strict < keeps
// the first minimum. V lanes, D = d (0: known at run time only).
template <int V, int D>
__attribute__((always_inline)) inline void nearest(const float* p, int np, int64_t d_rt, const Cents& c,
                                                   int64_t* code, float* best_out) {
  typedef typename Vec<V>::f vf;
  typedef typename Vec<V>::i vi;
  constexpr int ROWS = rows_for<V>();
  constexpr int DM = D ? D : 16;
  const int64_t d = D ? D : d_rt;
  vf x[ROWS][DM];  // x[r][j][lane] = coordinate j of point r * V + lane (missing points: 0)
  for (int r = 0; r < ROWS; r++)
    for (int64_t j = 0; j < d; j++)
      for (int l = 0; l < V; l++) {
        const int q = r * V + l;
        x[r][j][l] = q < np ? p[q * d + j] : 0.f;
      }
  vf best[ROWS];
  vi idx[ROWS];
  for (int r = 0; r < ROWS; r++) {
    best[r] = vf{} + std::numeric_limits<float>::infinity();
    idx[r] = vi{};
  }
  const float* m = c.neg2.data();
  for (int64_t k = 0; k < c.K; k++, m += d) {
    vf s[ROWS];
    for (int r = 0; r < ROWS; r++) s[r] = vf{} + c.cn[k];
    for (int64_t j = 0; j < d; j++)
      for (int r = 0; r < ROWS; r++) s[r] += x[r][j] * m[j];
    const vi kk = vi{} + (int32_t)k;
    for (int r = 0; r < ROWS; r++) {
      const vi lt = s[r] < best[r];
      best[r] = lt ? s[r] : best[r];
      idx[r] = lt ? kk : idx[r];
    }
  }
  for (int q = 0; q < np; q++) {
    code[q] = idx[q / V][q % V];
    if (best_out) best_out[q] = best[q / V][q % V];
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

int points_per_call() {  // of the path pick() chooses
#if FASQ_KM_X86
  const int level = fasq_cpu_isa_level();
  if (level >= 2) return rows_for<16>() * 16;
  if (level >= 1) return rows_for<8>() * 8;
#endif
  return rows_for<4>() * 4;
}

NearestFn pick(int64_t d) {
#if FASQ_KM_X86
  const int level = fasq_cpu_isa_level();
  if (level >= 2) return avx512_for(d);
  if (level >= 1) return avx2_for(d);
#endif
  return nearest_for<4>(d);
}


// --- k-means++ seeding ----------------------------------------------------------------------
// Squared distances to the nearest chosen centroid are kept in fp32 (points transposed to
// [d, N] so the update vectorises), summed in double per block of SEED_BLOCK points.
// A draw: target = u * total; the block where the running block sums first exceed it,
// then the point where the running sum inside that block does (the block's last point
// with a nonzero distance if rounding leaves it short).
constexpr int64_t SEED_BLOCK = 256;

__attribute__((always_inline)) inline void seed_one(const float* P, int64_t N, int64_t K, int64_t d,
                                                     int64_t first, const double* u, float* C) {
  const int64_t nblk = (N + SEED_BLOCK - 1) / SEED_BLOCK, Np = nblk * SEED_BLOCK;
  std::vector<float> soa(d * Np, 0.f), mind(Np, 0.f);
  std::vector<double> bsum(nblk);
  for (int64_t n = 0; n < N; n++)
    for (int64_t j = 0; j < d; j++) soa[j * Np + n] = P[n * d + j];
  auto take = [&](int64_t k, int64_t i) {
    for (int64_t j = 0; j < d; j++) C[k * d + j] = P[i * d + j];
    for (int64_t blk = 0; blk < nblk; blk++) {
      float* m = mind.data() + blk * SEED_BLOCK;
      const int64_t n0 = blk * SEED_BLOCK, n1 = std::min(N, n0 + SEED_BLOCK);
      float s[SEED_BLOCK];
      for (int64_t q = 0; q < SEED_BLOCK; q++) s[q] = 0.f;
      for (int64_t j = 0; j < d; j++) {
        const float c = C[k * d + j];
        const float* x = soa.data() + j * Np + n0;
#pragma omp simd
        for (int64_t q = 0; q < SEED_BLOCK; q++) s[q] += (x[q] - c) * (x[q] - c);
      }
      const int64_t len = n1 - n0;  // padding points keep distance 0
      if (k == 0)
        for (int64_t q = 0; q < len; q++) m[q] = s[q];
      else
        for (int64_t q = 0; q < len; q++) m[q] = std::min(m[q], s[q]);
      double acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t q = 0; q < len; q++) acc += m[q];
      bsum[blk] = acc;
    }
  };
  take(0, first);
  for (int64_t k = 1; k < K; k++) {
    double total = 0;
    for (int64_t blk = 0; blk < nblk; blk++) total += bsum[blk];
    int64_t pick = N - 1;
    if (total <= 0) {  // every point sits on a centroid: uniform
      pick = std::min<int64_t>(N - 1, (int64_t)(u[k] * N));
    } else {
      const double target = u[k] * total;
      double acc = 0;
      int64_t blk = nblk - 1;
      for (int64_t b = 0; b < nblk; b++) {
        if (acc + bsum[b] > target) {
          blk = b;
          break;
        }
        acc += bsum[b];
      }
      const int64_t n0 = blk * SEED_BLOCK, n1 = std::min(N, n0 + SEED_BLOCK);
      pick = -1;
      int64_t last = -1;
      for (int64_t n = n0; n < n1; n++) {
        if (mind[n] > 0) last = n;
        acc += mind[n];
        if (acc > target) {
          pick = n;
          break;
        }
      }
      if (pick < 0) pick = last >= 0 ? last : n0;
    }
    take(k, pick);
  }
}

typedef void (*SeedFn)(const float*, int64_t, int64_t, int64_t, int64_t, const double*, float*);

void seed_portable(const float* P, int64_t N, int64_t K, int64_t d, int64_t f, const double* u, float* C) {
  seed_one(P, N, K, d, f, u, C);
}
#if FASQ_KM_X86
FASQ_KM_AVX512 void seed_avx512(const float* P, int64_t N, int64_t K, int64_t d, int64_t f, const double* u,
                                float* C) {
  seed_one(P, N, K, d, f, u, C);
}
FASQ_KM_AVX2 void seed_avx2(const float* P, int64_t N, int64_t K, int64_t d, int64_t f, const double* u,
                            float* C) {
  seed_one(P, N, K, d, f, u, C);
}
#endif

SeedFn pick_seed() {
#if FASQ_KM_X86
  const int level = fasq_cpu_isa_level();
  if (level >= 2) return seed_avx512;
  if (level >= 1) return seed_avx2;
#endif
  return seed_portable;
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
  const int PTS = points_per_call();
  const int64_t blocks = (N + PTS - 1) / PTS;  // per problem
  const int nth = (nthreads > 1 && B * N * K >= (1 << 16)) ? nthreads : 1;
#pragma omp parallel for num_threads(nth) if (nth > 1) schedule(static)
  for (int64_t t = 0; t < B * blocks; t++) {
    const int64_t b = t / blocks, n0 = (t % blocks) * PTS;
    const int np = (int)std::min<int64_t>(PTS, N - n0);
    const float* p = points + (b * N + n0) * d;
    float best[MAX_PTS];
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
// the nearest centroid chosen so far (uniform when every distance is 0). See seed_one for
// the exact procedure (the torch code in fasq/quant/kmeans.py follows it step for step).
int fasq_cpu_kmeanspp(const float* points, int64_t B, int64_t N, int64_t K, int64_t d, const int64_t* first,
                      const double* u, float* centroids, int nthreads) {
  if (B <= 0 || N <= 0 || K <= 0 || d <= 0 || d > 16) return 1;
  const SeedFn fn = pick_seed();
  const int nth = (nthreads > 1 && B > 1 && N * K >= (1 << 14)) ? nthreads : 1;
#pragma omp parallel for num_threads(nth) if (nth > 1) schedule(dynamic, 1)
  for (int64_t b = 0; b < B; b++)
    fn(points + b * N * d, N, K, d, std::min(std::max<int64_t>(first[b], 0), N - 1), u + b * K,
       centroids + b * K * d);
  return 0;
}

}  // extern "C"
