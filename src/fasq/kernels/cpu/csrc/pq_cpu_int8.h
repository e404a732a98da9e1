// Internal to the int8 decode path of the fasq CPU library: what pq_cpu_int8.cpp (load-time
// preparation, the C ABI, the thread split) shares with the kernels of each instruction set,
// pq_cpu_int8_avx512.cpp (AVX-512 VBMI + VNNI: every format) and pq_cpu_int8_avx2.cpp (AVX2:
// 16-entry tables and the 8-bit grid). The layouts are described in pq_cpu_int8.cpp.
#pragma once

#include <stdint.h>

#include "pq_cpu.h"
#include "pq_cpu_kernels.h"

namespace fasq_int8 {

// Columns per activation block. Each block costs one int->float and one FMA per token and 16
// rows, so its width sets the multi-token cost; its rounding sets the accuracy. Default model,
// WikiText-2 10 x 2048 through this kernel (exact path 22.098): 8 columns 22.129 (+0.14 %),
// 16 columns 22.133 (+0.16 %); 16 columns take 6-15 % less time at 8-16 tokens (1024 x 1024
// in cache) and the same at 1. 32 columns (llama.cpp's Q8_0) moved an earlier default by
// +0.71 % against +0.375 % at 8.
constexpr int64_t BCOLS = 16;
constexpr int NT_MAX = 8;  // most tokens per pass over a row block (AVX-512; AVX2 takes 4)

using fasq_cpu::Run;  // subspaces [m0, m1), codebook c, scale group g

// How a layer's codes are laid out and looked up (pq_cpu_int8.cpp's header comment).
enum Layout { PAIRS, NIBBLES, BYTES };

// One call's quantized activations. Blocks: each run cut into 16-column pieces (a run's last
// one 8 columns when its length is an odd multiple of 8), numbered in run order (the kernels
// walk them in the same order).
struct Acts {
  const int8_t* xq;    // [T][in/8][8]
  const float* xs;     // [T][nblk] float step of each block
  const int32_t* xb;   // [T][nblk] each block's int8 sum (AVX2 adds back a table's 128 with it)
  const float* xsum;   // [T][R] float sums of x over each run (offsets), or NULL
  const float* rq;     // [T][R] sum over the run's blocks of step * int8 sum
  int64_t nblk, R;
};

// A prepared layer's buffers as the kernels read them.
struct Prepared {
  const uint8_t* codes;
  const uint8_t* tabs;
  const float* cbscale;  // [C] each codebook's int8 step
  const float* shift;    // [C] the bytes added to its table + the grid's centre
  const float* sign;     // [C] how AVX2 multiplies its bytes (SignMode)
  const float* scales;
  const float* offsets;
};

// How the AVX2 kernel multiplies a codebook's table bytes by int8 activations: vpmaddubsw
// multiplies unsigned by signed bytes and saturates the sum of two products at 16 bits, so
// bytes up to 32 (RTN's grids of 1-5 bits) are multiplied as they are and four products'
// pairs summed in 16 bits (4 x 2 x 32 x 127 < 2^15); other tables are turned back into signed
// values (bytes - 128 where 128 was added) and multiplied as |w| times x with w's sign, as
// llama.cpp does (2 x 128 x 127 < 2^15); the 128 comes back as 128 x the block's int8 sum in
// the int32 sum, which is then the AVX-512 kernels' (same bits out).
enum SignMode { SMALL = 0, SIGNED = 1, SIGNED_SHIFTED = 2 };

// Row block rb (16 rows), the tokens of `A` (already offset to the first one, at most the
// family's tokens per pass); tot [nt][16] written.
typedef void (*BlockFn)(const Run* runs, int64_t R, int64_t M, int64_t S, const Prepared& P, int64_t rb,
                        const Acts& A, float* tot);

// One token's activations x[in] (x_dtype) quantized per block (Acts): xq[in], xs[nblk],
// xb[nblk], rq[R] and, when rf is not NULL, rf[R] the float sums of x over each run.
typedef void (*QuantizeFn)(const void* x, int dt, const Run* runs, int64_t R, int64_t d, int8_t* xq, float* xs,
                           int32_t* xb, float* rq, float* rf);

// pq_cpu_int8_avx512.cpp (nullptr / false without x86 GCC or clang)
bool avx512_cpu();  // AVX-512 F/BW/VL + VBMI + VNNI
BlockFn avx512_pick(Layout lay, int64_t K, bool offsets, int nt);  // nt 1..8
extern const QuantizeFn avx512_quantize;
int avx512_lookup();              // how d=2 layers with 64 < K <= 256 look up (fasq_cpu_int8_lookup)
int avx512_set_lookup(int how);   // returns the previous setting

// pq_cpu_int8_avx2.cpp: layouts NIBBLES, BYTES and PAIRS with K <= 16 (one vpshufb a lookup)
constexpr int NT_MAX_AVX2 = 4;
bool avx2_cpu();  // AVX2 + FMA
BlockFn avx2_pick(Layout lay, bool offsets, int nt);  // nt 1..4
extern const QuantizeFn avx2_quantize;

}  // namespace fasq_int8
