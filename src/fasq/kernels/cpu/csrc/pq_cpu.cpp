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
//
// Files: this one holds the C ABI, the portable path and the choice of instruction set;
// pq_cpu_avx2.cpp and pq_cpu_avx512.cpp one instruction set each (pq_cpu_kernels.h is what
// they share); pq_cpu_int8.cpp the int8 path (AVX-512 VBMI + VNNI), kmeans_cpu.cpp k-means.

#include "pq_cpu_kernels.h"

namespace fasq_cpu {
namespace {

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
}  // namespace fasq_cpu

using namespace fasq_cpu;

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
