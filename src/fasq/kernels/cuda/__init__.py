"""CUDA C++ kernels of `fasq::pq_linear`, compiled at run time with NVRTC (no toolkit needed).

    gemv.py + csrc/pq_gemv.cu  decode GEMV; opt-in (kernel="cuda_gemv") until measured on a GPU
"""

from ..registry import register

register("cuda_gemv", f"{__name__}.gemv", "pq_linear_cuda_gemv", needs_triton=False, tunable=False)
