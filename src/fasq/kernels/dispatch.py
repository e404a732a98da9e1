"""Which kernel runs a pq_linear call: one pure function of the call's shape.

The thresholds are named constants so that benchmark data (benchmarks/bench_kernels.py,
results in benchmarks/results/) can tune them; the values below are first guesses from
the cost model in benchmarks/METHOD.md, not measurements.
"""

from __future__ import annotations

KERNELS = ("gemv", "lut_gemm", "dequant_gemm", "dequant_cublas", "reference")

# Decode: up to this many tokens the direct-compute GEMV (codes read once for all
# tokens, CUDA cores) is used. The GEMV itself accepts up to gemv.MAX_TOKENS (16).
GEMV_MAX_TOKENS = 8
# The most tokens the GEMV kernel accepts at all (it keeps BLOCK_T tokens in registers).
GEMV_TOKEN_LIMIT = 16
# The LUT GEMM (CUDA cores) is only considered for small codebooks, where building a
# tables of K entries per token and subspace is cheap, and few tokens; beyond that the
# tensor-core dequant GEMM is expected to win (crossover to be measured).
LUT_MAX_TOKENS = 32
LUT_MAX_K = 256
LUT_MIN_D = 2  # at d=1 a LUT lookup replaces a single multiply: never worth it
# From this many tokens on, rebuilding W once and running cuBLAS beats the fused kernels
# (the matmul is FLOP-bound there and cuBLAS runs the tensor cores best).
CUBLAS_MIN_TOKENS = 128


def select_kernel(device_type: str, tokens: int, d: int, K: int, *, has_triton: bool = True,
                  interpret: bool = False) -> str:
    """Name of the kernel for `tokens` rows of activations against a (d, K) layer.

    device_type: torch device type of the activations ("cuda", "cpu", ...);
    has_triton: whether triton can be imported; interpret: TRITON_INTERPRET=1 (the
    kernels then run, slowly, on CPU tensors, which the tests use).
    Returns one of KERNELS; "reference" means dequantize-then-matmul in torch.
    """
    if not has_triton or tokens <= 0:
        return "reference"
    if device_type != "cuda" and not interpret:
        return "reference"
    if tokens <= GEMV_MAX_TOKENS:
        return "gemv"
    if tokens >= CUBLAS_MIN_TOKENS:
        return "dequant_cublas"
    if tokens <= LUT_MAX_TOKENS and K <= LUT_MAX_K and d >= LUT_MIN_D:
        return "lut_gemm"
    return "dequant_gemm"
