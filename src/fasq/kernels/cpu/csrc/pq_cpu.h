// Declarations shared by pq_cpu.cpp and pq_cpu_int8.cpp (one library); kernels/cpu/library.py's
// _LayerArgs mirrors FasqLayerArgs through ctypes.
#pragma once

#include <stdint.h>

// A layer's fixed arguments of fasq_cpu_pq_linear / fasq_cpu_dequantize / the int8 kernel,
// prepared once by the caller (every field 8 bytes: no padding to mirror); calls then pass
// only x, T, y or W.
struct FasqLayerArgs {
  int64_t in, out;
  const void* codes;
  int64_t code_bytes;
  const void* codebooks;
  int64_t cb_dtype, C, K, d;
  const void* scales;
  const void* offsets;
  int64_t scale_dtype, S;
  const void* bias;
  int64_t bias_dtype;
};

extern "C" int fasq_cpu_isa_level(void);  // pq_cpu.cpp: 2 when AVX-512 is present and allowed
