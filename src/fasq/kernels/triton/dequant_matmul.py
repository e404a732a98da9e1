"""Prefill at many tokens: dequantize the whole weight with a Triton kernel, then cuBLAS.

At a few hundred tokens and more a matmul is bound by tensor-core FLOPs, not by weight
bytes, and cuBLAS runs them better than a fused Triton kernel that also has to gather
centroids between MMAs. Rebuilding W[out, in] once costs one pass over the codes plus
one write and one read of an fp16 weight (out*in*4 bytes: ~64 MiB, ~25 us on an H100
for 4096 x 4096), which is small next to the matmul at >= 512 tokens. The dispatcher
picks this path only there; the benchmark measures where the crossover is.

The dequantize kernel: a program owns a [BLOCK_N rows x BLOCK_M subspaces] tile, loads
its codes (contiguous along M), gathers the centroids as packed words (gemv.py), applies
scales/offsets and writes the tile's BLOCK_M*d columns. At d = 2 the two elements of each
centroid are interleaved in registers (tl.join) so the store is one contiguous row
segment; other d store each element with a stride of d (L2 merges the partial lines).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .common import INTERPRET, Problem, next_pow2, tune_bench
from .gemv import _TL_DTYPE, _centroid_part, packed_codebooks


def _configs():
    if INTERPRET:  # tiles that do not divide the test shapes
        return [triton.Config(dict(BLOCK_N=16, BLOCK_M=8), num_warps=4)]
    return [triton.Config(dict(BLOCK_N=bn, BLOCK_M=bm), num_warps=nw, num_stages=2)
            for bn, bm, nw in ((16, 128, 4), (32, 128, 4), (32, 256, 8), (64, 64, 4), (64, 128, 8))]


def _prune(configs, named_args, **kwargs):
    a = {**named_args, **kwargs}
    keep = [c for c in configs if c.kwargs["BLOCK_M"] <= max(64, next_pow2(a["M"]))]
    return keep or configs[:1]


@triton.autotune(configs=_configs(), key=["N", "M", "K", "C", "D", "MS_ALIGN"],
                 prune_configs_by={"early_config_prune": _prune}, do_bench=tune_bench)
@triton.jit
def dequant_kernel(
    codes_ptr,  # [N, M] codes, row-major (uint8/int16/int32)
    cbw_ptr,  # [C, K, WPC] codebooks as packed words (gemv.packed_codebooks)
    scales_ptr,  # [N, S] (if HAS_SCALES)
    offsets_ptr,  # [N, S] (if HAS_OFFSETS)
    w_ptr,  # [N, M*D] output weight, row-major (activation dtype)
    N, M, K, C, MPC, S, MS,
    D: tl.constexpr, MS_ALIGN: tl.constexpr, ONE_GROUP: tl.constexpr,
    HAS_SCALES: tl.constexpr, HAS_OFFSETS: tl.constexpr, HAS_BIAS: tl.constexpr,
    WPC: tl.constexpr, EPW: tl.constexpr, ESIZE: tl.constexpr, CB_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] rows
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] subspaces
    wmask = (n < N)[:, None] & (m < M)[None, :]  # [BN, BM]
    code = tl.load(codes_ptr + n[:, None] * M + m[None, :], mask=wmask, other=0).to(tl.int32)
    word0 = ((m // MPC) * K)[None, :] * WPC + code * WPC  # [BN, BM] first word of each centroid
    if HAS_SCALES:
        g = (m // MS)[None, :]  # [1, BM] scale group of each subspace
        s = tl.load(scales_ptr + n[:, None] * S + g, mask=wmask, other=0.0).to(tl.float32)
        if HAS_OFFSETS:
            o = tl.load(offsets_ptr + n[:, None] * S + g, mask=wmask, other=0.0).to(tl.float32)
    row = w_ptr + n[:, None] * (M * D)  # [BN, 1]
    out_ty = w_ptr.dtype.element_ty
    if D == 2 and WPC == 1 and EPW == 2:  # one 32-bit word per centroid: interleave, one store
        word = tl.load(cbw_ptr + word0, mask=wmask, other=0)
        w0 = _centroid_part(word, 0, EPW, ESIZE, CB_DTYPE)
        w1 = _centroid_part(word, 1, EPW, ESIZE, CB_DTYPE)
        if HAS_SCALES:
            w0, w1 = w0 * s, w1 * s
            if HAS_OFFSETS:
                w0, w1 = w0 + o, w1 + o
        pair = tl.reshape(tl.join(w0, w1), [BLOCK_N, 2 * BLOCK_M])  # [BN, 2*BM], (m, e) -> 2m+e
        col = tl.program_id(1) * (2 * BLOCK_M) + tl.arange(0, 2 * BLOCK_M)  # [2*BM]
        cmask = (n < N)[:, None] & (col < M * D)[None, :]
        tl.store(row + col[None, :], pair.to(out_ty), mask=cmask)
    else:
        for wi in tl.static_range(WPC):
            word = tl.load(cbw_ptr + word0 + wi, mask=wmask, other=0)
            for e in tl.static_range(EPW):
                w = _centroid_part(word, e, EPW, ESIZE, CB_DTYPE)  # [BN, BM] fp32, element j
                if HAS_SCALES:
                    w = w * s
                    if HAS_OFFSETS:
                        w += o
                col = m * D + wi * EPW + e  # [BM]
                tl.store(row + col[None, :], w.to(out_ty), mask=wmask)


def dequantize_triton(codes, codebooks, scales=None, offsets=None, dtype=torch.float16,
                      config: dict | None = None) -> torch.Tensor:
    """W[out, in] in `dtype`, the same function as fasq.core.ops.dequantize."""
    N, M = codes.shape
    p = Problem(torch.empty(0, M * codebooks.shape[2], dtype=dtype, device=codes.device), codes, codebooks,
                scales, offsets, None)
    if p.codebooks.dtype not in _TL_DTYPE:
        raise TypeError(f"codebooks must be fp16/bf16/fp32, got {p.codebooks.dtype}")
    words, wpc, epw, es = packed_codebooks(p.codebooks)
    w = torch.empty(N, M * p.D, dtype=dtype, device=codes.device)
    args = dict(codes_ptr=p.codes, cbw_ptr=words, scales_ptr=p.scales, offsets_ptr=p.offsets, w_ptr=w,
                N=N, M=M, K=p.K, C=p.C, MPC=p.MPC, S=p.S, WPC=wpc, EPW=epw, ESIZE=es,
                CB_DTYPE=_TL_DTYPE[p.codebooks.dtype], **p.flags())
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, meta["BLOCK_M"]))  # noqa: E731
    if config is None:
        dequant_kernel[grid](**args)
    else:
        dequant_kernel.fn[grid](**args, **config)
    return w


def dequant_cublas(x, codes, codebooks, scales=None, offsets=None, bias=None, config: dict | None = None,
                   out=None):
    """y[..., out] = x[..., in] @ W.T + bias: W rebuilt by dequant_kernel, then F.linear."""
    if x.dtype not in _TL_DTYPE:
        raise TypeError(f"activations must be fp16/bf16/fp32, got {x.dtype}")
    W = dequantize_triton(codes, codebooks, scales, offsets, dtype=x.dtype, config=config)  # [out, in]
    y = F.linear(x, W, None if bias is None else bias.to(x.dtype))
    if out is None:
        return y
    out.copy_(y.reshape(out.shape))
    return out.view(*x.shape[:-1], codes.shape[0])
