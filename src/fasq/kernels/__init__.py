"""The kernels of `fasq::pq_linear`, each family beside the torch reference it must match
(`fasq.core.ops`):
    triton/       GPU kernels in Triton (decode GEMV, LUT GEMM, dequant + GEMM, dequant + cuBLAS)
    cuda/         a decode GEMV in CUDA C++ (NVRTC), opt-in until measured on a GPU
    cpu/          the CPU kernels: a C++ library through ctypes (exact float and int8 paths)
    registry.py   kernel names -> launchers (imported on first call)
    dispatch.py   which kernel runs a call: pure functions of the call's shape

Importing this package registers the CUDA and CPU implementations of `fasq::pq_linear`;
it needs neither triton nor a GPU nor a compiler (those are used when a kernel is first
called). Every launcher shares the reference ops' signature:
    pq_linear_triton(x, codes, codebooks, scales=None, offsets=None, bias=None, kernel="auto")
"""

from __future__ import annotations

import importlib
import importlib.util
import os

from torch import Tensor

from ..core import ops
from . import registry
from .dispatch import select_kernel

from . import triton, cuda  # noqa: F401,I001 - register their kernels (nothing compiled or imported yet)

registry.register("reference", ops.__name__, "pq_linear_dequant", needs_triton=False, tunable=False)

KERNELS = registry.names()
__all__ = ["HAS_TRITON", "KERNELS", "select_kernel", "pq_linear_triton", "pq_linear_gemv",
           "pq_linear_lut_gemm", "pq_linear_dequant_gemm"]

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def pq_linear_triton(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor | None = None,
                     offsets: Tensor | None = None, bias: Tensor | None = None, kernel: str = "auto",
                     config: dict | None = None, out: Tensor | None = None) -> Tensor:
    """y[..., out] = x[..., in] @ dequantize(codes, codebooks, scales, offsets).T + bias.

    kernel: "auto" (select_kernel decides), or force one of KERNELS.
    config: pin a kernel config (tile sizes, SPLIT_K, ...) instead of autotuning.
    out: optional [tokens, out] tensor of x's dtype to write into (returned reshaped).
    """
    if kernel == "auto":
        kernel = select_kernel(x.device.type, x.numel() // max(1, x.shape[-1]), codebooks.shape[2],
                               codebooks.shape[1], has_triton=HAS_TRITON, interpret=INTERPRET)
    fn = registry.launcher(kernel, HAS_TRITON)
    if registry.get(kernel).tunable:
        return fn(x, codes, codebooks, scales, offsets, bias, config=config, out=out)
    y = fn(x, codes, codebooks, scales, offsets, bias)  # no config, no out= of its own
    if out is not None:
        out.copy_(y.reshape(out.shape))
    return y


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

from .cpu import linear as cpu_linear  # noqa: E402,F401 - registers the CPU implementation (compiled on first call)
from .cpu import dense as cpu_dense  # noqa: E402,F401 - and of fasq::dense_linear
