"""`fasq::pq_linear` on the CPU: picks the path (see `dispatch.select_cpu_kernel`) among the
exact kernels of `library.py`, the int8 kernel of `int8.py` and the torch reference, and
registers itself as the op's CPU implementation. Its own module so that `cpu_int8` can
build on `cpu` without a cycle.

    pq_linear_cpu(x, codes, codebooks, scales=None, offsets=None, bias=None, kernel="auto")
    pq_linear_parts_cpu(x, codes, codebooks, scales, offsets)   (lists: fasq::pq_linear_parts)
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ...core import ops
from ..dispatch import CPU_INT8_MAX_TOKENS, CPU_KERNELS, select_cpu_kernel
from . import library as cpu, int8 as cpu_int8, torch_ops


def _auto_int8(tokens: int, setting: str, codes: Tensor, codebooks: Tensor, scales: Tensor | None,
               offsets: Tensor | None, bias: Tensor | None) -> "cpu_int8._Prepared | None":
    """The layer's int8 copies where automatic selection sends this call to the int8 path
    (decode-sized, FASQ_CPU_INT8 (`setting`) not off, a format and CPU it takes, and `chosen`:
    d=1 float codebooks only with FASQ_CPU_INT8=all), else None. The library is loaded."""
    if tokens > CPU_INT8_MAX_TOKENS or setting in cpu.OFF:
        return None
    prep = cpu_int8.prepared(codes, codebooks, scales, offsets, bias)
    return prep if prep is not None and cpu_int8.chosen(prep, setting) else None


def pq_linear_cpu(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor | None = None,
                  offsets: Tensor | None = None, bias: Tensor | None = None, kernel: str = "auto") -> Tensor:
    """y[..., out] = x[..., in] @ dequantize(codes, codebooks, scales, offsets).T + bias.

    kernel: "auto" (select_cpu_kernel decides) or force one of CPU_KERNELS.
    """
    if kernel == "auto":
        kernel = cpu._forced or os.environ.get("FASQ_CPU_KERNEL") or "auto"
    if kernel == "auto":
        tokens = x.numel() // max(1, x.shape[-1])
        has = cpu.available()
        prep = _auto_int8(tokens, cpu_int8._setting(), codes, codebooks, scales, offsets, bias) if has else None
        kernel = select_cpu_kernel(tokens, codebooks.shape[2], codebooks.shape[1], has_library=has,
                                   int8=prep is not None)
        if kernel == "cpu_int8":
            return cpu_int8.run(prep, x)
    if kernel not in CPU_KERNELS:
        raise ValueError(f"unknown CPU kernel {kernel!r}; choose 'auto' or one of {CPU_KERNELS}")
    if kernel == "reference":
        return ops.pq_linear_dequant(x, codes, codebooks, scales, offsets, bias)
    if not cpu.available():
        raise RuntimeError(f"the fasq CPU kernel is unavailable: {cpu._lib_error}")
    fn = {"cpu_int8": cpu_int8.gemv, "cpu_gemv": cpu.gemv}.get(kernel, cpu.dequant_matmul)
    return fn(x, codes, codebooks, scales, offsets, bias)


def pq_linear_parts_cpu(x: Tensor, codes: list[Tensor], codebooks: list[Tensor], scales: list[Tensor | None],
                        offsets: list[Tensor | None]) -> Tensor:
    """fasq::pq_linear_parts on the CPU: one int8 call for all parts where automatic selection
    takes the int8 path for every one of them (decode), else `pq_linear_cpu` part by part."""
    parts = list(zip(codes, codebooks, scales, offsets))
    if not (cpu._forced or os.environ.get("FASQ_CPU_KERNEL")) and cpu.available():
        tokens, setting = x.numel() // max(1, x.shape[-1]), cpu_int8._setting()
        preps = [_auto_int8(tokens, setting, *p, None) for p in parts]
        if all(p is not None for p in preps):
            return cpu_int8.run_parts(preps, x)
    return torch.cat([pq_linear_cpu(x, *p, None) for p in parts], dim=-1)


def _pq_linear_cpu_op(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor | None,
                      offsets: Tensor | None, bias: Tensor | None) -> Tensor:
    return pq_linear_cpu(x, codes, codebooks, scales, offsets, bias, kernel="auto")


def _first_pq_linear(x, codes, codebooks, scales, offsets, bias) -> Tensor:
    """fasq::pq_linear on the CPU until the C++ op takes the CPU key: loads it, then runs."""
    torch_ops.load()
    return _pq_linear_cpu_op(x, codes, codebooks, scales, offsets, bias)


def _first_pq_linear_parts(x, codes, codebooks, scales, offsets) -> Tensor:
    torch_ops.load()
    return pq_linear_parts_cpu(x, codes, codebooks, scales, offsets)


ops.register_kernel("cpu", _first_pq_linear)
ops.register_parts_kernel("cpu", _first_pq_linear_parts)

# The Python implementations as ops of their own: where the C++ op (torch_ops.py) sends the
# calls it does not take itself.
_LIB = torch.library.Library("fasq_cpu", "DEF")
_LIB.define("pq_linear(Tensor x, Tensor codes, Tensor codebooks, Tensor? scales, Tensor? offsets, "
            "Tensor? bias) -> Tensor")
_LIB.impl("pq_linear", _pq_linear_cpu_op, "CPU")
_LIB.define("pq_linear_parts(Tensor x, Tensor[] codes, Tensor[] codebooks, Tensor?[] scales, "
            "Tensor?[] offsets) -> Tensor")
_LIB.impl("pq_linear_parts", pq_linear_parts_cpu, "CPU")
