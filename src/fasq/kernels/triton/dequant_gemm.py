"""Prefill GEMM on tensor cores: dequantize a weight tile in registers, then `tl.dot`.

A program owns a [BLOCK_T tokens x BLOCK_N rows] output tile and one split of the
subspaces. Per step it loads a [BLOCK_M, BLOCK_N] tile of codes (BLOCK_M subspaces =
BLOCK_M*d input columns), gathers the centroids as packed words (as in gemv.py), and for
each of the d centroid elements j runs one MMA:
    acc[t, n] += sum_m x[t, m*d + j] * W[n, m*d + j]
i.e. the reduction is reordered by (j, m) instead of column order, so the unpacked
elements never need interleaving (no join/permute shuffles); the x tile is read with a
stride of d instead (it is small and L1/L2 resident).

Scales: one per row (no offsets) are applied once to the accumulator at the end; grouped
scales or offsets are applied to the weight tile before the MMA (an FMA per weight,
amortised over BLOCK_T tokens).

Overlap: codes, codebook words and activations of the next step do not depend on the
current MMA, so Triton's pipeliner (num_stages) prefetches the plain loads of the `m0`
loop; the codebook gather depends on the codes just loaded and the dequantization math
runs on CUDA cores between MMAs (no warp specialisation), which is what bounds this
path below cuBLAS at large token counts; the benchmark measures by how much.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, Problem, launch, may_split, next_pow2, num_sms, split_range, store_output, tune_bench
from .gemv import _TL_DTYPE, _centroid_part, packed_codebooks


def _configs():
    if INTERPRET:  # tl.dot needs >= 16 along every dimension
        return [triton.Config(dict(BLOCK_T=16, BLOCK_N=16, BLOCK_M=16, SPLIT_K=2), num_warps=4)]
    # (BLOCK_T, BLOCK_N, BLOCK_M, warps): a hand-picked list in the style of gemlite's,
    # from skinny decode-like tiles to square prefill tiles; kept short because each
    # config is compiled per (d, flags) and timed per layer shape and token bucket.
    tiles = [(16, 64, 32, 4), (16, 128, 32, 4), (32, 128, 32, 4), (64, 64, 32, 4), (64, 128, 32, 4),
             (64, 128, 64, 4), (128, 128, 32, 8), (128, 256, 32, 8), (64, 256, 32, 8), (128, 128, 64, 8)]
    return [triton.Config(dict(BLOCK_T=bt, BLOCK_N=bn, BLOCK_M=bm, SPLIT_K=sk), num_warps=nw, num_stages=3)
            for bt, bn, bm, nw in tiles for sk in (1, 2, 4)]


def _prune(configs, named_args, **kwargs):
    """Tiles that fit (accumulator and weight tile in registers), no token tile far beyond
    the token count, split K only while output tiles are scarce."""
    a = {**named_args, **kwargs}
    T, N, M = a["T"], a["N"], a["M"]
    sms = num_sms(a["y_ptr"].device)
    keep = []
    for c in configs:
        k = c.kwargs
        regs = k["BLOCK_T"] * k["BLOCK_N"] + 2 * k["BLOCK_M"] * k["BLOCK_N"]
        if regs > 96 * 32 * c.num_warps or k["BLOCK_T"] > max(16, next_pow2(T)):
            continue
        if k["BLOCK_M"] > max(16, next_pow2(M)):
            continue
        tiles = triton.cdiv(N, k["BLOCK_N"]) * triton.cdiv(T, k["BLOCK_T"])
        if k["SPLIT_K"] > 1 and (tiles >= 2 * sms or M // k["SPLIT_K"] < 4 * k["BLOCK_M"]):
            continue
        keep.append(c)
    return keep or configs[:1]


@triton.autotune(configs=_configs(), key=["T_BUCKET", "N", "M", "K", "C", "D", "MS_ALIGN"],
                 prune_configs_by={"early_config_prune": _prune}, reset_to_zero=["ws_ptr"], do_bench=tune_bench)
@triton.jit
def dequant_gemm_kernel(
    x_ptr,  # [T, M*D] activations, row-major (fp16/bf16; fp32 runs the MMA in ieee fp32)
    codes_ptr,  # [N, M] codes, row-major (uint8/int16/int32)
    cbw_ptr,  # [C, K, WPC] codebooks as packed words (see gemv.packed_codebooks)
    scales_ptr,  # [N, S] (if HAS_SCALES)
    offsets_ptr,  # [N, S] (if HAS_OFFSETS)
    bias_ptr,  # [N] (if HAS_BIAS)
    y_ptr,  # [T, N] output, activation dtype
    ws_ptr,  # [T*N + tiles] fp32 zeros (split-K accumulator)
    lock_ptr,  # [tiles] int32 zeros (split-K arrival counters)
    T, N, M, K, C, MPC, S, MS, T_BUCKET,
    D: tl.constexpr, MS_ALIGN: tl.constexpr, ONE_GROUP: tl.constexpr,
    HAS_SCALES: tl.constexpr, HAS_OFFSETS: tl.constexpr, HAS_BIAS: tl.constexpr,
    WPC: tl.constexpr, EPW: tl.constexpr, ESIZE: tl.constexpr, CB_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_k = tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] output rows
    nmask = n < N
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT] tokens
    tmask = t < T
    m_lo, m_hi = split_range(M, pid_k, SPLIT_K, BLOCK_M)
    END_SCALE: tl.constexpr = HAS_SCALES and ONE_GROUP and not HAS_OFFSETS
    ELEMWISE: tl.constexpr = HAS_SCALES and not END_SCALE
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)  # [BM] subspaces
        mmask = m < m_hi
        wmask = mmask[:, None] & nmask[None, :]  # [BM, BN]
        xmask = tmask[:, None] & mmask[None, :]  # [BT, BM]
        code = tl.load(codes_ptr + n[None, :] * M + m[:, None], mask=wmask, other=0).to(tl.int32)  # [BM, BN]
        word0 = ((m // MPC) * K)[:, None] * WPC + code * WPC  # [BM, BN] first word of each centroid
        if ELEMWISE:
            g = (m // MS)[:, None]  # [BM, 1] scale group of each subspace
            s = tl.load(scales_ptr + n[None, :] * S + g, mask=wmask, other=0.0).to(tl.float32)
            if HAS_OFFSETS:
                o = tl.load(offsets_ptr + n[None, :] * S + g, mask=wmask, other=0.0).to(tl.float32)
        for wi in tl.static_range(WPC):
            word = tl.load(cbw_ptr + word0 + wi, mask=wmask, other=0)
            for e in tl.static_range(EPW):
                w = _centroid_part(word, e, EPW, ESIZE, CB_DTYPE)  # [BM, BN] fp32, element j
                if ELEMWISE:
                    w = w * s
                    if HAS_OFFSETS:
                        w += o
                a = tl.load(x_ptr + t[:, None] * (M * D) + (m * D + wi * EPW + e)[None, :],
                            mask=xmask, other=0.0)  # [BT, BM], column j of each subspace
                w = w.to(a.dtype)  # the MMA operand type (fp16/bf16): the rounding the GPU sees
                if DOT_FP32:  # interpreter: its bf16 tl.dot is wrong, emulate in fp32
                    a, w = a.to(tl.float32), w.to(tl.float32)
                acc = tl.dot(a, w, acc, input_precision=DOT_PREC)
    if END_SCALE:
        acc = acc * tl.load(scales_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tile = pid_t * tl.cdiv(N, BLOCK_N) + pid_n
    store_output(acc, y_ptr, ws_ptr, lock_ptr, bias_ptr, t, n, T, N, tile, HAS_BIAS, SPLIT_K)


def dequant_gemm(x, codes, codebooks, scales=None, offsets=None, bias=None, config: dict | None = None, out=None):
    """y[..., out] = x[..., in] @ W.T + bias with the dequantize + tl.dot GEMM."""
    p = Problem(x, codes, codebooks, scales, offsets, bias, out)
    if p.T == 0:
        return p.output()
    if x.dtype not in _TL_DTYPE or p.codebooks.dtype not in _TL_DTYPE:
        raise TypeError(f"activations and codebooks must be fp16/bf16/fp32, got {x.dtype}, {p.codebooks.dtype}")
    words, wpc, epw, es = packed_codebooks(p.codebooks)
    split = may_split(dequant_gemm_kernel, config, triton.cdiv(p.N, 256) * triton.cdiv(p.T, 128), p.x.device)
    ws, locks = p.workspace(triton.cdiv(p.N, 16) * triton.cdiv(p.T, 16), split)  # smallest tiles: 16 x 16
    args = dict(x_ptr=p.x, codes_ptr=p.codes, cbw_ptr=words, scales_ptr=p.scales, offsets_ptr=p.offsets,
                bias_ptr=p.bias, y_ptr=p.y, ws_ptr=ws, lock_ptr=locks, T=p.T, N=p.N, M=p.M, K=p.K, C=p.C,
                MPC=p.MPC, S=p.S, T_BUCKET=min(next_pow2(p.T), 4096), WPC=wpc, EPW=epw, ESIZE=es,
                CB_DTYPE=_TL_DTYPE[p.codebooks.dtype],
                DOT_PREC="ieee" if x.dtype == torch.float32 or INTERPRET else "tf32", DOT_FP32=INTERPRET,
                **p.flags())
    grid = lambda meta: (triton.cdiv(p.N, meta["BLOCK_N"]), triton.cdiv(p.T, meta["BLOCK_T"]),  # noqa: E731
                         meta["SPLIT_K"])
    launch(dequant_gemm_kernel, grid, args, config)
    return p.output()
