"""Triton kernels of `fasq::pq_linear`, one file per family (configs, pruner, autotuned
kernel, launcher); triton is imported only when a launcher is first called.

    gemv.py            decode GEMV, 1..16 tokens, LUT-free direct compute, split-K
    lut_gemm.py        prefill GEMM by on-chip look-up tables (CUDA cores)
    dequant_gemm.py    prefill GEMM: codes -> weight tile in registers, tl.dot (tensor cores)
    dequant_matmul.py  many tokens: a Triton kernel rebuilds W, then cuBLAS (kernel "dequant_cublas")
    common.py          problem sizes, launch grid, split-K, autotuning helpers
"""

from ..registry import register

register("gemv", f"{__name__}.gemv", "gemv")
register("lut_gemm", f"{__name__}.lut_gemm", "lut_gemm")
register("dequant_gemm", f"{__name__}.dequant_gemm", "dequant_gemm")
register("dequant_cublas", f"{__name__}.dequant_matmul", "dequant_cublas")
