"""Which kernel runs a pq_linear call: one pure function of the call's shape.

The thresholds are named constants tuned from benchmark data (benchmarks/bench_kernels.py;
the H100 numbers behind each value are in benchmarks/results/kernels-nvidia-h100-80gb-hbm3.json and quoted
below, in microseconds per call with CUDA-graph timing).
"""

from __future__ import annotations

# The kernels are named in `registry` (each family registers its own). cuda_gemv (CUDA C++
# compiled with NVRTC, kernels/cuda/gemv.py) is never chosen here: it runs only when asked
# for (kernel="cuda_gemv") until it has been checked and timed on a GPU.

# Decode: up to this many tokens the direct-compute GEMV (codes read once for all
# tokens, CUDA cores) runs. H100, d=2 K=256: 1 token 35.9 (GEMV) vs 33.3 (rebuild +
# cuBLAS) at 4096x4096, 12.8 vs 12.9 at 1024x4096, 111 vs 118 at 14336x4096; from 4
# tokens on the GEMV loses (63.8 vs 33.1), so only single-token calls take it.
GEMV_MAX_TOKENS = 1
# The most tokens the GEMV kernel accepts at all (it keeps BLOCK_T tokens in registers).
GEMV_TOKEN_LIMIT = 16
# Rebuilding W (Triton gather, then cuBLAS) costs one pass over the codes and one write
# of W when the codebook stays in cache: 15 us at 4096x4096, d=2 K=256. A codebook with
# more than this many values (K * d) per group makes the gathers miss: d=4 K=4096 takes
# 159 us there, so the fused tensor-core GEMM (dequant_gemm, 34-43 us up to 16 tokens)
# runs instead until CUBLAS_MIN_TOKENS.
REBUILD_MAX_CODEBOOK = 2048
# From this many tokens on, rebuild + cuBLAS beats the fused kernels for every codebook
# (d=4 K=4096, 128 tokens: 48 vs 64 us at 1024x4096, 562 vs 636 at 14336x4096).
CUBLAS_MIN_TOKENS = 128
# The LUT GEMM is never chosen automatically: on the H100 it was the slowest path at
# every measured shape (0.17-21 ms where the best path took 12-150 us). It stays
# available with kernel="lut_gemm" for study and other hardware.


def select_kernel(device_type: str, tokens: int, d: int, K: int, *, has_triton: bool = True,
                  interpret: bool = False) -> str:
    """Name of the kernel for `tokens` rows of activations against a (d, K) layer.

    device_type: torch device type of the activations ("cuda", "cpu", ...);
    has_triton: whether triton can be imported; interpret: TRITON_INTERPRET=1 (the
    kernels then run, slowly, on CPU tensors, which the tests use).
    Returns a registered kernel name; "reference" means dequantize-then-matmul in torch.
    """
    if not has_triton or tokens <= 0:
        return "reference"
    if device_type != "cuda" and not interpret:
        return "reference"
    if tokens <= GEMV_MAX_TOKENS:
        return "gemv"
    if tokens >= CUBLAS_MIN_TOKENS or K * d <= REBUILD_MAX_CODEBOOK:
        return "dequant_cublas"
    return "dequant_gemm"


# --- CPU ---------------------------------------------------------------------------------

CPU_KERNELS = ("cpu_int8", "cpu_gemv", "cpu_dequant", "reference")

# Up to this many tokens the CPU decode kernel (no W built) runs; above it W is rebuilt
# once per call into a reused buffer and torch's matmul runs. The kernel decodes the codes
# once per 4 tokens, so its cost grows in steps of 4 while the rebuild's is flat. Measured
# on a 2-core AMD EPYC (Zen 4), bf16, d=2 K=256, microseconds kernel / rebuild+matmul:
# 576x576: 4 tokens 71 / 128, 8 tokens 137 / 136; 4096x4096: 4 tokens 2037 / 3741,
# 8 tokens 4463 / 3695; d=4 K=4096 at 4096x4096: 2864 / 4059 and 5594 / 4151.
CPU_GEMV_MAX_TOKENS = 6


# Up to this many tokens the int8 kernel (cpu_int8: int8 lookups by vpermi2b, products by
# vpdpbusd) runs where it takes the layer: each looked-up tile serves 8 tokens, so its cost
# grows slowly with tokens. Xeon with AVX-512 VBMI/VNNI, 1 thread, d=2 K=256, bf16, codes
# from memory, microseconds int8 / exact path (benchmarks/results/decode-cpu.json):
# 4096x4096: 1 token 1397 / 3940 (cpu_gemv), 16 tokens 3366 / 7561 (rebuild + matmul);
# 576x576: 48 / 88 and 152 / 202. On AVX2 (vpshufb, 4 tokens a pass; 2-core AMD EPYC capped
# at AVX2, 2 threads, 4096x4096): RTN 4-bit 155 / 629 us at 1 token, 1403 / 2676 at 16; d=1
# K=16 190 / 714 and 1916 / 2771. 16 is the most tokens the issue asked for (vLLM decode
# batches, speculative decoding); beyond it prefill's rebuild + matmul is unchanged.
CPU_INT8_MAX_TOKENS = 16


def select_cpu_kernel(tokens: int, d: int, K: int, *, has_library: bool = True, int8: bool = False) -> str:
    """Name of the CPU path for `tokens` rows of activations against a (d, K) layer; one of
    CPU_KERNELS ("reference" when the C++ library could not be built or loaded).
    int8: whether the int8 kernel takes this layer here (CPU, format, FASQ_CPU_INT8)."""
    if not has_library or tokens <= 0:
        return "reference"
    if int8 and tokens <= CPU_INT8_MAX_TOKENS:
        return "cpu_int8"
    return "cpu_gemv" if tokens <= CPU_GEMV_MAX_TOKENS else "cpu_dequant"


# Up to this many tokens fasq::dense_linear runs the CPU's bf16 kernel (dense_cpu_bf16.cpp:
# one pass over W per 4 tokens); above it torch's matmul. 2-core AMD EPYC (Zen 4), 2 threads,
# weights cycled through 600 MB, ms kernel / torch, two runs where they differed:
# 49152x2048: 1 token 2.6-4.2 / 5.8-7.9, 4 tokens 5.1 / 6.0, 8 and 16 tokens even;
# 49152x576: 1 token 0.9-1.2 / 1.6-2.0, 4 tokens 1.5-1.8 / 1.7-2.4, 8 tokens 2.4-2.5 / 2.0-2.7.
CPU_DENSE_MAX_TOKENS = 4
