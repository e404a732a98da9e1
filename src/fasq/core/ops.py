"""Reference ops on the storage format: the CPU path and the oracle for GPU kernels.

Tensor layout (one quantized linear layer, W[out, in], M = in / d subspaces):
    codes:     [out, M]     integer (uint8 for K <= 256, int16 for K <= 32768, else int32)
    codebooks: [C, K, d]    C divides M; subspace m uses codebook m // (M // C)
    scales:    [out, S]     optional; S divides in; scale group = in / S columns
    offsets:   [out, S]     optional (needs scales); added after scaling
    W[o, m*d:(m+1)*d] = codebooks[m // (M // C), codes[o, m]] * scales[o, g] + offsets[o, g]
with g the scale group of those columns.

`pq_linear` is a `torch.library` op (with a fake implementation, so `torch.compile` and
CUDA graphs can trace it); its default implementation is dequantize-then-matmul. The CPU
and GPU kernels register their own implementations (see `fasq.kernels`).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Bound the [tokens, out, M] gather of the LUT op to about this many elements.
_LUT_CHUNK_ELEMS = 1 << 24


def code_dtype(K: int) -> torch.dtype:
    """The narrowest torch integer dtype that holds codes 0..K-1."""
    if K <= 256:
        return torch.uint8
    if K <= 32768:
        return torch.int16
    return torch.int32


def _subspace_codebook(M: int, C: int, device) -> Tensor:
    """[M] index of the codebook each subspace uses."""
    return torch.arange(M, device=device) // (M // C)


def dequantize(codes: Tensor, codebooks: Tensor, scales: Tensor | None = None,
               offsets: Tensor | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """Rebuild W[out, in] (in `dtype`, default the codebooks' dtype)."""
    out, M = codes.shape
    C, K, d = codebooks.shape
    dtype = dtype or codebooks.dtype
    cb = codebooks.to(dtype)
    # Flat index into [C*K, d]: codebook of the subspace * K + code.
    flat = _subspace_codebook(M, C, codes.device) * K + codes.long()  # [out, M]
    W = cb.reshape(C * K, d)[flat].reshape(out, M * d)  # [out, in]
    return _apply_scales(W, scales, offsets)


def _apply_scales(W: Tensor, scales: Tensor | None, offsets: Tensor | None) -> Tensor:
    if scales is None:
        return W
    out, n = W.shape
    S = scales.shape[1]
    Wg = W.reshape(out, S, n // S) * scales.to(W.dtype)[:, :, None]
    if offsets is not None:
        Wg = Wg + offsets.to(W.dtype)[:, :, None]
    return Wg.reshape(out, n)


def pq_linear_dequant(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor | None = None,
                      offsets: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """y[..., out] = x[..., in] @ W.T + bias, by dequantize-then-matmul."""
    W = dequantize(codes, codebooks, scales, offsets, dtype=x.dtype)
    return torch.nn.functional.linear(x, W, None if bias is None else bias.to(x.dtype))


def pq_linear_lut(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor | None = None,
                  offsets: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """Same function as `pq_linear_dequant`, by look-up tables.

    For each token and subspace, LUT[t, m, k] = x[t, m] . codebook_m[k] (dot products with
    all K centroids); then y[t, o] = sum over m of LUT[t, m, codes[o, m]], per scale group
    times scales[o, g], plus offsets[o, g] * (sum of x over group g).
    """
    out, M = codes.shape
    C, K, d = codebooks.shape
    lead = x.shape[:-1]
    xt = x.reshape(-1, M, d).float()  # [T, M, d]
    T = xt.shape[0]
    cb = codebooks.float()[_subspace_codebook(M, C, x.device)]  # [M, K, d]
    lut = torch.einsum("tmd,mkd->tmk", xt, cb)  # [T, M, K]
    S = 1 if scales is None else scales.shape[1]
    Ms = M // S  # subspaces per scale group
    idx = codes.long().t()  # [M, out]
    y = torch.empty(T, out, dtype=torch.float32, device=x.device)
    rows = max(1, _LUT_CHUNK_ELEMS // max(1, out * M))
    for t0 in range(0, T, rows):
        part = lut[t0:t0 + rows]  # [t, M, K]
        g = torch.gather(part, 2, idx[None].expand(part.shape[0], M, out))  # [t, M, out]
        per_group = g.reshape(-1, S, Ms, out).sum(2)  # [t, S, out]
        if scales is not None:
            per_group = per_group * scales.float().t()[None]
        y[t0:t0 + rows] = per_group.sum(1)
    if offsets is not None:
        xsum = xt.reshape(T, S, Ms * d).sum(-1)  # [T, S]
        y += xsum @ offsets.float().t()
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype).reshape(*lead, out)


# --- the custom op -------------------------------------------------------------------
# Defined with torch.library.Library rather than @custom_op: a call then costs ~3 us of
# dispatch instead of ~10 us, which matters at decode (a 135M model makes 210 calls per
# token). No autograd: inference only.
#
# Devices register Python kernels with `register_kernel` (and its twins below). They are
# reached through the op's default implementation, which picks by the device of x (devices
# without one run dequantize-then-matmul), and not through the device's dispatch key: that
# key stays free for a compiled kernel to take at run time, which passes the calls it does
# not take back to the Python one (the CPU's: fasq.kernels.cpu.torch_ops).

_LIB = torch.library.Library("fasq", "DEF")
_KERNELS: dict[str, dict[str, object]] = {"pq_linear": {}, "pq_linear_parts": {}, "dense_linear": {}}


def _by_device(op: str, fallback):
    """The default implementation of fasq::`op`: the kernel registered for x's device, else
    `fallback` (the torch reference)."""
    kernels = _KERNELS[op]

    def impl(x, *args):
        return kernels.get(x.device.type, fallback)(x, *args)
    return impl


_LIB.define("pq_linear(Tensor x, Tensor codes, Tensor codebooks, Tensor? scales, Tensor? offsets, "
            "Tensor? bias) -> Tensor")
_LIB.impl("pq_linear", _by_device("pq_linear", pq_linear_dequant), "CompositeExplicitAutograd")


@torch.library.register_fake("fasq::pq_linear", lib=_LIB)
def _(x, codes, codebooks, scales, offsets, bias):
    return x.new_empty(*x.shape[:-1], codes.shape[0])


def register_kernel(device_type: str, fn) -> None:
    """Make `fn(x, codes, codebooks, scales, offsets, bias)` the implementation of
    fasq::pq_linear for tensors on `device_type` ("cpu", "cuda", ...)."""
    _KERNELS["pq_linear"][device_type] = fn


# y = x @ dequantize(codes, codebooks, scales, offsets).T + bias, through the dispatcher
pq_linear = torch.ops.fasq.pq_linear.default


# Several quantized matrices that share their input (a merged layer's sub-matrices: q, k and
# v, or gate and up, as vLLM holds them), outputs concatenated: one call where a device's
# kernel can do them together (the CPU's int8 decode path), fasq::pq_linear per part elsewhere.
_LIB.define("pq_linear_parts(Tensor x, Tensor[] codes, Tensor[] codebooks, Tensor?[] scales, "
            "Tensor?[] offsets) -> Tensor")


def pq_linear_parts_reference(x: Tensor, codes: list[Tensor], codebooks: list[Tensor],
                              scales: list[Tensor | None], offsets: list[Tensor | None]) -> Tensor:
    """[x @ W_0.T | x @ W_1.T | ...]: x [..., in]; part i: codes [out_i, in / d], codebooks,
    scales and offsets as for fasq::pq_linear (no bias); y [..., sum out_i]."""
    return torch.cat([pq_linear(x, c, cb, s, o, None) for c, cb, s, o in zip(codes, codebooks, scales, offsets)],
                     dim=-1)


_LIB.impl("pq_linear_parts", _by_device("pq_linear_parts", pq_linear_parts_reference), "CompositeExplicitAutograd")


@torch.library.register_fake("fasq::pq_linear_parts", lib=_LIB)
def _(x, codes, codebooks, scales, offsets):
    return x.new_empty(*x.shape[:-1], sum(c.shape[0] for c in codes))


def register_parts_kernel(device_type: str, fn) -> None:
    """Make `fn(x, codes, codebooks, scales, offsets)` (lists) the implementation of
    fasq::pq_linear_parts for tensors on `device_type`."""
    _KERNELS["pq_linear_parts"][device_type] = fn


pq_linear_parts = torch.ops.fasq.pq_linear_parts.default


# A dense linear layer that a fasq model keeps unquantized (its output head, by default), as
# an op so that a device can run its own decode kernel for it (the CPU's: fasq.kernels.cpu.
# dense) and torch.compile still traces the call; torch's F.linear elsewhere.
_LIB.define("dense_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")


def dense_linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """y[..., out] = x[..., in] @ weight.T + bias; weight [out, in], bias [out] or None."""
    return torch.nn.functional.linear(x, weight, bias)


_LIB.impl("dense_linear", _by_device("dense_linear", dense_linear_reference), "CompositeExplicitAutograd")


@torch.library.register_fake("fasq::dense_linear", lib=_LIB)
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def register_dense_kernel(device_type: str, fn) -> None:
    """Make `fn(x, weight, bias)` the implementation of fasq::dense_linear on `device_type`."""
    _KERNELS["dense_linear"][device_type] = fn


dense_linear = torch.ops.fasq.dense_linear.default
