// fasq decode GEMV for CUDA GPUs: y[t, o] += sum_m dot(W[o, m*D : (m+1)*D], x[t, m*D : (m+1)*D])
// for a few tokens, straight from the codes (LUT-free direct compute, as in the FASQ paper).
//
// Compiled at run time with NVRTC (fasq/kernels/cuda/gemv.py), so users need no CUDA
// toolkit; every instantiation listed by the launcher is compiled in one program per GPU
// architecture and cached on disk.
//
// One quantized layer W[out, in], M = in / D subspaces, C codebooks of K centroids:
//   x         [T, in]        fp16 or bf16 (InT: f16 / bf16 below), T <= NT
//   codes     [out, M]       uint8 (K <= 256) or uint16 (K <= 32768), row-major
//   codebooks [C, K, D]      InT; subspace m uses codebook m / span (span = M / C)
//   scales    [out, S]       InT or nullptr; offsets [out, S] InT or nullptr (needs scales)
//   y32       [T, out]       fp32, zeroed by the caller; partial sums are atomically added
//                            (several blocks share a row when the codebooks are split)
//
// Grid: (ceil(out / (WARPS * ROWS)), splits). Block: WARPS warps. Block (bx, by) owns
// rows [bx*WARPS*ROWS, ...) and the codebooks [by*cbs, (by+1)*cbs) (cbs = codebooks per
// split), i.e. subspaces [by*cbs*span, min(M, (by+1)*cbs*span)). It stages those codebooks
// in shared memory (`repl` copies interleaved word by word so that lanes
// reading random centroids spread over `repl` times more banks), then each warp takes a row:
// its lanes stream the row's codes with 16-byte loads (16 uint8 or 8 uint16 codes), look
// the centroids up in shared memory, and accumulate fp32 FMAs with the activations (read
// through L1, shared by every warp of the block); a butterfly of warp shuffles reduces the
// lanes and lane 0 adds the row's partial sums to y32. The epilogue kernel adds the bias
// and casts y32 to the activation dtype.

// No CUDA headers (NVRTC from PyPI ships none): 16-bit floats are raw bits converted
// with PTX cvt instructions (bf16 conversions need sm_80).

namespace fasq {

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
struct __align__(16) uint4_ { u32 x, y, z, w; };
struct f16 { u16 bits; };   // IEEE half
struct bf16 { u16 bits; };  // bfloat16

__device__ __forceinline__ float to_f(f16 v) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
  return f;
}
__device__ __forceinline__ float to_f(bf16 v) { return __int_as_float((int)((u32)v.bits << 16)); }
__device__ __forceinline__ void from_f(float v, f16* p) {
  u16 b;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(b) : "f"(v));
  p->bits = b;
}
__device__ __forceinline__ void from_f(float v, bf16* p) {
  u16 b;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b) : "f"(v));
  p->bits = b;
}

// 16-bit centroid value j of word-interleaved shared codebooks: element e of the staged
// codebooks lives in 32-bit word e/2, and with `repl` copies word w of copy r sits at
// w * repl + r (consecutive copies in consecutive banks).
template <typename InT>
__device__ __forceinline__ float smem_elem(const u32* sm, u32 e, u32 repl, u32 copy) {
  const u32 word = sm[(e >> 1) * repl + copy];
  InT v;
  v.bits = (e & 1) ? (u16)(word >> 16) : (u16)(word & 0xffff);
  return to_f(v);
}

template <int D, int NT, typename CodeT, typename InT, int WARPS>
__global__ void __launch_bounds__(WARPS * 32)
pq_gemv(const InT* __restrict__ x, const CodeT* __restrict__ codes, const InT* __restrict__ codebooks,
        const InT* __restrict__ scales, const InT* __restrict__ offsets, float* __restrict__ y32,
        int T, int out, int M, int K, int span, int cbs, int S, int gsub, int repl) {
  extern __shared__ u32 sm[];  // staged codebooks: cbs * K * D 16-bit values, `repl` copies
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int c_begin = blockIdx.y * cbs;
  const int m_begin = c_begin * span, m_end = min(M, m_begin + cbs * span);
  const int n_cb = (m_end - m_begin + span - 1) / span;  // codebooks this block stages

  // Stage the codebooks (as 32-bit words: two 16-bit values each), REPL copies.
  const u32 words = (u32)(n_cb * K * D + 1) / 2;
  const u32* src = reinterpret_cast<const u32*>(codebooks + (size_t)c_begin * K * D);
  for (u32 w = threadIdx.x; w < words; w += blockDim.x) {
    const u32 v = src[w];  // codebooks are 4-byte aligned and K*D*C is even for every D>1; D=1 has K>=2
    for (int r = 0; r < repl; r++) sm[w * repl + r] = v;
  }
  __syncthreads();
  const u32 copy = lane % repl;

  const int row = (blockIdx.x * WARPS + warp);
  if (row >= out) return;
  float acc[NT];
#pragma unroll
  for (int t = 0; t < NT; t++) acc[t] = 0.f;

  const CodeT* crow = codes + (size_t)row * M;
  // one code: its D weights (codebook value * scale + offset) against every token
  auto consume = [&](int m, u32 code) {
    const int g = m / gsub;
    const float s = scales ? to_f(scales[(size_t)row * S + g]) : 1.f;
    const float off = offsets ? to_f(offsets[(size_t)row * S + g]) : 0.f;
    const u32 e0 = ((u32)((m - m_begin) / span) * (u32)K + code) * D;
#pragma unroll
    for (int j = 0; j < D; j++) {
      const float w = fmaf(smem_elem<InT>(sm, e0 + j, repl, copy), s, off);
#pragma unroll
      for (int t = 0; t < NT; t++)
        if (t < T) acc[t] = fmaf(w, to_f(x[(size_t)t * M * D + (size_t)m * D + j]), acc[t]);
    }
  };

  constexpr int VEC = 16 / sizeof(CodeT);  // codes per 16-byte load
  const bool aligned = ((size_t)(crow + m_begin) % 16 == 0);
  int m = m_begin;
  if (aligned) {
    for (; m + VEC * 32 <= m_end; m += VEC * 32) {
      const uint4_ v = *reinterpret_cast<const uint4_*>(crow + m + lane * VEC);
      const CodeT* c = reinterpret_cast<const CodeT*>(&v);
#pragma unroll
      for (int i = 0; i < VEC; i++) consume(m + lane * VEC + i, c[i]);
    }
  }
  for (int mm = m + lane; mm < m_end; mm += 32) consume(mm, crow[mm]);

#pragma unroll
  for (int t = 0; t < NT; t++) {
    float v = acc[t];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0 && t < T) atomicAdd(y32 + (size_t)t * out + row, v);
  }
}

// y[t, o] = y32[t, o] + bias[o], cast to InT.
template <typename InT>
__global__ void pq_epilogue(const float* __restrict__ y32, const InT* __restrict__ bias, InT* __restrict__ y,
                            int T, int out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= T * out) return;
  const float b = bias ? to_f(bias[i % out]) : 0.f;
  from_f(y32[i] + b, y + i);
}

}  // namespace fasq
