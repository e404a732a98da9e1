"""Triton kernels for `fasq::pq_linear` on CUDA GPUs.

Three kernel families, one file each (configs, early config pruner, autotuned
@triton.jit kernel, launcher), plus a dispatcher:
    gemv.py          decode GEMV, 1..16 tokens, LUT-free direct compute, split-K
    lut_gemm.py      prefill GEMM by on-chip look-up tables (CUDA cores)
    dequant_gemm.py  prefill GEMM: codes -> weight tile in registers, tl.dot (tensor cores)
    dequant_cublas.py  many tokens: a Triton kernel rebuilds W, then cuBLAS (F.linear)
    cuda_gemv.py     decode GEMV in CUDA C++ (csrc/pq_gemv.cu), compiled with NVRTC at run
                     time; opt-in (kernel="cuda_gemv") until measured on a GPU
    cpu.py           the CPU implementation (csrc/pq_cpu.cpp through ctypes)
    dispatch.py      select_kernel(): which one runs a call (pure, no triton needed)

Importing this package registers the CUDA implementation of `fasq::pq_linear`; it needs
neither triton nor a GPU (triton is imported when a kernel is first called).
All launchers share the signature of the reference ops in `fasq.ops`:
    pq_linear_triton(x, codes, codebooks, scales=None, offsets=None, bias=None, kernel="auto")
"""

from __future__ import annotations

import importlib
import importlib.util
import os

from torch import Tensor

from .. import ops
from .dispatch import KERNELS, select_kernel

__all__ = ["HAS_TRITON", "KERNELS", "select_kernel", "pq_linear_triton", "pq_linear_gemv",
           "pq_linear_lut_gemm", "pq_linear_dequant_gemm"]

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# kernel name -> (module, launcher function)
_LAUNCHERS = {"gemv": ("gemv", "gemv"), "lut_gemm": ("lut_gemm", "lut_gemm"),
              "dequant_gemm": ("dequant_gemm", "dequant_gemm"),
              "dequant_cublas": ("dequant_cublas", "dequant_cublas")}


def _launcher(name: str):
    if not HAS_TRITON:
        raise RuntimeError(f"fasq kernel {name!r} needs triton: pip install 'fasq[triton]' (or triton>=3.0)")
    module, fn = _LAUNCHERS[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), fn)


def pq_linear_triton(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor | None = None,
                     offsets: Tensor | None = None, bias: Tensor | None = None, kernel: str = "auto",
                     config: dict | None = None, out: Tensor | None = None) -> Tensor:
    """y[..., out] = x[..., in] @ dequantize(codes, codebooks, scales, offsets).T + bias.

    kernel: "auto" (select_kernel decides), or force one of KERNELS.
    config: pin a kernel config (tile sizes, SPLIT_K, ...) instead of autotuning.
    out: optional [tokens, out] tensor of x's dtype to write into (returned reshaped).
    """
    if kernel == "auto":
        _, d = codebooks.shape[0], codebooks.shape[2]
        kernel = select_kernel(x.device.type, x.numel() // max(1, x.shape[-1]), d, codebooks.shape[1],
                               has_triton=HAS_TRITON, interpret=INTERPRET)
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose 'auto' or one of {KERNELS}")
    if kernel in ("reference", "cuda_gemv"):  # not Triton: no config, no out= of their own
        if kernel == "reference":
            fn = ops.pq_linear_dequant
        else:
            from .cuda_gemv import pq_linear_cuda_gemv as fn
        y = fn(x, codes, codebooks, scales, offsets, bias)
        if out is not None:
            out.copy_(y.reshape(out.shape))
        return y
    return _launcher(kernel)(x, codes, codebooks, scales, offsets, bias, config=config, out=out)


def pq_linear_gemv(x, codes, codebooks, scales=None, offsets=None, bias=None, **kw) -> Tensor:
    """Decode GEMV (at most 16 tokens)."""
    return pq_linear_triton(x, codes, codebooks, scales, offsets, bias, kernel="gemv", **kw)


def pq_linear_lut_gemm(x, codes, codebooks, scales=None, offsets=None, bias=None, **kw) -> Tensor:
    """LUT GEMM (CUDA cores)."""
    return pq_linear_triton(x, codes, codebooks, scales, offsets, bias, kernel="lut_gemm", **kw)


def pq_linear_dequant_gemm(x, codes, codebooks, scales=None, offsets=None, bias=None, **kw) -> Tensor:
    """Dequantize-tile + tl.dot GEMM (tensor cores)."""
    return pq_linear_triton(x, codes, codebooks, scales, offsets, bias, kernel="dequant_gemm", **kw)


def _pq_linear_cuda(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor | None,
                    offsets: Tensor | None, bias: Tensor | None) -> Tensor:
    """CUDA implementation of fasq::pq_linear: the dispatcher picks the kernel; without
    triton it falls back to the reference dequantize-then-matmul."""
    return pq_linear_triton(x, codes, codebooks, scales, offsets, bias, kernel="auto")


ops.register_kernel("cuda", _pq_linear_cuda)

from . import cpu_linear  # noqa: E402,F401 - registers the CPU implementation (compiled on first call)
