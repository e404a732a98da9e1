"""`fasq::dense_linear` on the CPU: decode of the layers a fasq checkpoint keeps dense in
bf16 (its output head, by default) through the library's AVX-512 BF16 kernel
(csrc/dense_cpu_bf16.cpp); torch's F.linear for everything else (prefill, other dtypes,
CPUs without AVX-512 BF16).

At a few tokens a dense layer is one pass over its weights, and torch's bf16 matmul reads
them at a fraction of the memory's speed on a 2-core AMD EPYC (Zen 4): 49152 x 2048 at one
token 8.5 ms (24 GB/s) where this kernel takes 3.0 ms (66 GB/s, copy bandwidth 89 GB/s;
benchmarks/results/decode-cpu-dense-2threads.json). The sums are fp32 like torch's; only
their order differs.

Switches: FASQ_CPU_DENSE=0 keeps torch's matmul for a process; `use_torch()` for a block.

    dense_linear_cpu(x, weight, bias)   (the op's CPU implementation)
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from ...core import ops
from ..dispatch import CPU_DENSE_MAX_TOKENS
from . import library as cpu

_off = False  # use_torch()


def available() -> bool:
    """Whether this CPU runs the kernel now (AVX-512 BF16, and the instruction-set cap
    `cpu.limit_isa` / FASQ_CPU_ISA not below "avx512")."""
    lib = cpu.load_library()
    return lib is not None and bool(lib.fasq_cpu_bf16_available())


def enabled() -> bool:
    """Whether calls may take the kernel (FASQ_CPU_DENSE unset or not 0, outside `use_torch`)."""
    return not _off and not cpu.switched_off("FASQ_CPU_DENSE")


@contextlib.contextmanager
def use_torch():
    """Inside this block fasq::dense_linear runs torch's matmul on the CPU (comparisons)."""
    global _off
    old, _off = _off, True
    try:
        yield
    finally:
        _off = old


def takes(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether the kernel runs this call: bf16 x, weight and bias, a contiguous weight (no copy
    of it per call), at most CPU_DENSE_MAX_TOKENS tokens, on a CPU that has it, not switched off."""
    return (x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and weight.dim() == 2
            and weight.numel() > 0 and weight.is_contiguous() and (bias is None or bias.dtype == torch.bfloat16)
            and x.numel() <= CPU_DENSE_MAX_TOKENS * x.shape[-1] and enabled() and available())


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """y[..., out] = x[..., in] @ weight.T + bias by the kernel (bf16; raises where `available`
    is False). x: [..., in]; weight: [out, in]; bias: [out] or None; out: optional contiguous
    bf16 [tokens, out] to write into (returned viewed as y's shape)."""
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"x has {x.shape[-1]} features, weight is [{out_f}, {in_f}]")
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or (bias is not None and bias.dtype != x.dtype):
        raise ValueError("the CPU dense kernel takes bf16 x, weight and bias")
    xk, w = x.contiguous(), weight.contiguous()
    b = None if bias is None else bias.contiguous()
    T = xk.numel() // in_f if in_f else 0
    if out is None:
        out = torch.empty(T, out_f, dtype=x.dtype)
    elif out.shape != (T, out_f) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {(T, out_f)}")
    err = cpu.load_library().fasq_cpu_bf16_linear(w.data_ptr(), out_f, in_f, cpu._ptr(b), xk.data_ptr(), T,
                                                 out.data_ptr(), torch.get_num_threads())
    if err:
        raise RuntimeError("fasq CPU dense kernel: " + ("unavailable on this CPU (AVX-512 BF16)" if err == 3
                                                        else "a non-positive size"))
    return out.view(*x.shape[:-1], out_f)


def dense_linear_cpu(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """fasq::dense_linear on the CPU: the kernel where it `takes` the call, else F.linear."""
    if takes(x, weight, bias):
        return linear(x, weight, bias)
    return ops.dense_linear_reference(x, weight, bias)


ops.register_dense_kernel("cpu", dense_linear_cpu)
