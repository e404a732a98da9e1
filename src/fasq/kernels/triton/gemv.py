"""Decode GEMV (1 to ~8 tokens): LUT-free direct compute, split-K.

A program owns BLOCK_N output rows x one split of the M subspaces. Per step it loads a
[BLOCK_N, BLOCK_M] tile of codes (contiguous along M, so wide vector loads of the
dominant byte stream), gathers the centroids those codes name, rebuilds the weights in
registers (x scale + offset when present) and multiplies with the activation
sub-vectors of all BLOCK_T tokens at once (the codes are read once for every token).

Why no LUT here: a LUT costs T*K*d FMAs per subspace and is only repaid when more than
K rows share it; at decode the kernel is bound by the code bytes, and a gather + d FMAs
per weight is cheaper than building tables.

Codebook gathers (the real cost after the code bytes):
* CB_SMEM=0: `tl.load(cb + code*...)` from global memory. The codebook is tiny (1 KiB at
  d=2, K=256) and stays in L1/L2; this is what gemlite/AQLM-style Triton kernels do.
* CB_SMEM=1 (one codebook per matrix, small K only): the codebook is loaded into
  registers once per program and `tl.gather` looks codes up in it, which Triton lowers
  through shared memory: cheaper per lookup than L1 tag checks, but adds reshapes. The
  autotuner picks between the two from measurements.
* Centroids are gathered as packed words: d fp16 values are 2*d bytes, so a centroid is
  one 32-bit load at d=2, one 64-bit load at d=4, two at d=8 (cuts gather count by d/1
  to d/4); the words are unpacked with shifts + bitcasts in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import GEMV_TOKEN_LIMIT as MAX_TOKENS  # tokens held in registers at once
from .common import INTERPRET, Problem, launch, next_pow2, num_sms, split_range, store_output, tune_bench


def _configs():
    if INTERPRET:  # small tiles that do not divide the test shapes, split-K on
        return [triton.Config(dict(BLOCK_N=16, BLOCK_M=8, SPLIT_K=2, CB_SMEM=0, ACC3=1), num_warps=4)]
    # Kept small on purpose: every config is compiled once per (d, token block, flags)
    # and timed once per layer shape. Wide BLOCK_M = long contiguous code loads per row;
    # the split is chosen by the pruner so that every SM gets work.
    out = []
    for sk in (1, 2, 4, 8, 16):
        for bn in (16, 32, 64):
            for bm in (128, 256):  # per-step reduction across BLOCK_M
                out.append(triton.Config(dict(BLOCK_N=bn, BLOCK_M=bm, SPLIT_K=sk, CB_SMEM=0, ACC3=0),
                                         num_warps=4, num_stages=2))
        for bn in (16, 32):
            for bm in (64, 128):  # 3-D accumulator, one reduction at the end (more registers)
                out.append(triton.Config(dict(BLOCK_N=bn, BLOCK_M=bm, SPLIT_K=sk, CB_SMEM=0, ACC3=1),
                                         num_warps=4, num_stages=2))
    for sk in (1, 2, 4, 8):  # the on-chip codebook variant (one codebook, small K)
        out.append(triton.Config(dict(BLOCK_N=32, BLOCK_M=128, SPLIT_K=sk, CB_SMEM=1, ACC3=1), num_warps=4,
                                 num_stages=2))
    return out


def _prune(configs, named_args, **kwargs):
    """Keep configs that fit in registers, do not overshoot the problem, give every SM
    at least one program (at most 8) and do not split K into slivers."""
    a = {**named_args, **kwargs}
    N, M, BT, K, C = a["N"], a["M"], a["BLOCK_T"], a["K"], a["C"]
    sms = num_sms(a["y_ptr"].device)
    keep = []
    for c in configs:
        k = c.kwargs
        if k["BLOCK_N"] * k["BLOCK_M"] * BT > 128 * 32 * c.num_warps:  # [BT, BN, BM] products: <= 128 regs/thread
            continue
        if k["ACC3"] and k["BLOCK_N"] * k["BLOCK_M"] * BT > 64 * 32 * c.num_warps:  # + a 3-D accumulator
            continue
        if k["BLOCK_M"] > max(64, next_pow2(M)) or k["BLOCK_N"] > max(16, next_pow2(N)):
            continue
        if k["CB_SMEM"] and not (C == 1 and a["WPC"] * K <= 2048):
            continue
        if k["SPLIT_K"] > 1 and M // k["SPLIT_K"] < 2 * k["BLOCK_M"]:
            continue
        progs = triton.cdiv(N, k["BLOCK_N"]) * k["SPLIT_K"]
        if not (sms <= progs <= 8 * sms):
            continue
        keep.append(c)
    # Tiny problems: nothing reaches one program per SM; keep the smallest tiles.
    return keep or [c for c in configs if c.kwargs["BLOCK_N"] == 16 and c.kwargs["BLOCK_M"] == 64
                    and not c.kwargs["CB_SMEM"]][:4]


@triton.jit
def _centroid_part(word, e: tl.constexpr, EPW: tl.constexpr, ESIZE: tl.constexpr, CB_DTYPE: tl.constexpr):
    """Element e of a packed codebook word, as fp32. word: [...] uint32/uint64 (or the
    element type itself when EPW == 1)."""
    # if/else, not an early return: compiled Triton type-checks the code after a
    # constexpr-true `return` too (the interpreter does not).
    if EPW == 1:
        out = word.to(tl.float32)
    else:
        bits = (word >> (e * 8 * ESIZE)).to(tl.int16 if ESIZE == 2 else tl.int32)
        out = bits.to(CB_DTYPE, bitcast=True).to(tl.float32)
    return out


@triton.autotune(configs=_configs(), key=["N", "M", "K", "C", "BLOCK_T", "D", "MS_ALIGN"],
                 prune_configs_by={"early_config_prune": _prune}, reset_to_zero=["ws_ptr"], do_bench=tune_bench)
@triton.jit
def gemv_kernel(
    x_ptr,  # [T, M*D] activations, row-major (fp16/bf16/fp32)
    codes_ptr,  # [N, M] codes, row-major (uint8/int16/int32)
    cbw_ptr,  # [C, K, WPC] codebooks as packed words (uint32/uint64, or the element type)
    scales_ptr,  # [N, S] scales (if HAS_SCALES)
    offsets_ptr,  # [N, S] offsets (if HAS_OFFSETS)
    bias_ptr,  # [N] bias (if HAS_BIAS)
    y_ptr,  # [T, N] output, activation dtype
    ws_ptr,  # [T*N + tiles] fp32 zeros (split-K accumulator)
    lock_ptr,  # [tiles] int32 zeros (split-K arrival counters)
    T, N, M, K, C, MPC, S, MS,
    D: tl.constexpr, MS_ALIGN: tl.constexpr, ONE_GROUP: tl.constexpr,
    HAS_SCALES: tl.constexpr, HAS_OFFSETS: tl.constexpr, HAS_BIAS: tl.constexpr,
    WPC: tl.constexpr, EPW: tl.constexpr, ESIZE: tl.constexpr, CB_DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    SPLIT_K: tl.constexpr, CB_SMEM: tl.constexpr, CB_WORDS: tl.constexpr, ACC3: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] output rows
    nmask = n < N
    t = tl.arange(0, BLOCK_T)  # [BT] tokens
    tmask = t < T
    m_lo, m_hi = split_range(M, pid_k, SPLIT_K, BLOCK_M)
    # Scales apply to whole blocks when no block straddles two scale groups; else per weight.
    PER_BLOCK: tl.constexpr = HAS_SCALES and (ONE_GROUP or MS_ALIGN % BLOCK_M == 0)
    ELEMWISE: tl.constexpr = HAS_SCALES and not PER_BLOCK
    if CB_SMEM:  # the one codebook, [K*WPC] words (padded to CB_WORDS), on chip for the whole program
        cw = tl.arange(0, CB_WORDS)
        cb_all = tl.load(cbw_ptr + cw, mask=cw < K * WPC, other=0)
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    # ACC3: keep per-lane products in a [BT, BN, BM] accumulator and reduce across BM once
    # at the end, instead of a cross-thread tl.sum every step (the first H100 run spent
    # most of the GEMV's time in those per-step reductions: 36 us at 4096x4096 where the
    # weight rebuild of dequant_cublas took 15 us).
    if ACC3:
        acc3 = tl.zeros([BLOCK_T, BLOCK_N, BLOCK_M], dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)  # [BM] subspaces
        mmask = m < m_hi
        wmask = nmask[:, None] & mmask[None, :]  # [BN, BM]
        xmask = tmask[:, None] & mmask[None, :]  # [BT, BM]
        code = tl.load(codes_ptr + n[:, None] * M + m[None, :], mask=wmask, other=0).to(tl.int32)
        if CB_SMEM:  # one codebook (C == 1); masked lanes have code 0, so always in range
            word0 = code * WPC  # [BN, BM] first word of the centroid
        else:
            word0 = ((m // MPC) * K)[None, :] * WPC + code * WPC  # [BN, BM]
        if ELEMWISE:
            g = (m // MS)[None, :]  # [1, BM] scale group of each subspace
            s = tl.load(scales_ptr + n[:, None] * S + g, mask=wmask, other=0.0).to(tl.float32)
            if HAS_OFFSETS:
                o = tl.load(offsets_ptr + n[:, None] * S + g, mask=wmask, other=0.0).to(tl.float32)
        if PER_BLOCK:
            g0 = m0 // MS
            sb = tl.load(scales_ptr + n * S + g0, mask=nmask, other=0.0).to(tl.float32)  # [BN]
            if HAS_OFFSETS:
                ob = tl.load(offsets_ptr + n * S + g0, mask=nmask, other=0.0).to(tl.float32)  # [BN]
        if not ACC3:  # per-step partial sums (ACC3 accumulates in acc3 instead)
            part = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
            xsum = tl.zeros([BLOCK_T], dtype=tl.float32)
        for wi in tl.static_range(WPC):
            if CB_SMEM:
                flat = tl.reshape(word0 + wi, [BLOCK_N * BLOCK_M])
                word = tl.reshape(tl.gather(cb_all, flat, 0), [BLOCK_N, BLOCK_M])
            else:
                word = tl.load(cbw_ptr + word0 + wi, mask=wmask, other=0)
            for e in tl.static_range(EPW):
                w = _centroid_part(word, e, EPW, ESIZE, CB_DTYPE)  # [BN, BM] fp32
                if ELEMWISE:
                    w = w * s
                    if HAS_OFFSETS:
                        w += o
                xj = tl.load(x_ptr + t[:, None] * (M * D) + (m * D + wi * EPW + e)[None, :],
                             mask=xmask, other=0.0).to(tl.float32)  # [BT, BM]
                if ACC3:
                    if PER_BLOCK:  # scale (and offset) the weights: no per-step reduction to scale
                        w = w * sb[:, None]
                        if HAS_OFFSETS:
                            w += ob[:, None]
                    acc3 += w[None, :, :] * xj[:, None, :]
                else:
                    part += tl.sum(w[None, :, :] * xj[:, None, :], axis=2)
                    if PER_BLOCK and HAS_OFFSETS:
                        xsum += tl.sum(xj, axis=1)
        if PER_BLOCK and not ACC3:
            part = part * sb[None, :]
            if HAS_OFFSETS:  # sum_j (c_j*s + o) x_j = s*sum c_j x_j + o*sum x_j
                part += ob[None, :] * xsum[:, None]
        if not ACC3:
            acc += part
    if ACC3:
        acc = tl.sum(acc3, axis=2)
    store_output(acc, y_ptr, ws_ptr, lock_ptr, bias_ptr, t, n, T, N, pid_n, HAS_BIAS, SPLIT_K)


_WORD = {4: torch.int32, 8: torch.int64}
_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def packed_codebooks(codebooks: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """(words [C, K, WPC], WPC words per centroid, EPW elements per word, element size).
    A centroid of d elements is read as 32/64-bit words when its bytes allow it."""
    C, K, D = codebooks.shape
    es = codebooks.element_size()
    nbytes = D * es
    for wbytes in (8, 4):
        if nbytes % wbytes == 0 and wbytes > es:
            return codebooks.view(_WORD[wbytes]), nbytes // wbytes, wbytes // es, es
    return codebooks, D, 1, es


def gemv(x, codes, codebooks, scales=None, offsets=None, bias=None, config: dict | None = None, out=None):
    """y[..., out] = x[..., in] @ W.T + bias with the decode GEMV (tokens <= MAX_TOKENS)."""
    p = Problem(x, codes, codebooks, scales, offsets, bias, out)
    if p.T > MAX_TOKENS:
        raise ValueError(f"gemv handles at most {MAX_TOKENS} tokens, got {p.T}; use a GEMM path")
    if p.T == 0:
        return p.output()
    if p.codebooks.dtype not in _TL_DTYPE:
        raise TypeError(f"codebooks must be fp16/bf16/fp32, got {p.codebooks.dtype}")
    words, wpc, epw, es = packed_codebooks(p.codebooks)
    ws, locks = p.workspace(triton.cdiv(p.N, 16))  # smallest BLOCK_N is 16
    args = dict(x_ptr=p.x, codes_ptr=p.codes, cbw_ptr=words, scales_ptr=p.scales, offsets_ptr=p.offsets,
                bias_ptr=p.bias, y_ptr=p.y, ws_ptr=ws, lock_ptr=locks, T=p.T, N=p.N, M=p.M, K=p.K, C=p.C,
                MPC=p.MPC, S=p.S, WPC=wpc, EPW=epw, ESIZE=es, CB_DTYPE=_TL_DTYPE[p.codebooks.dtype],
                BLOCK_T=next_pow2(p.T), CB_WORDS=next_pow2(p.K * wpc), **p.flags())
    grid = lambda meta: (triton.cdiv(p.N, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
    launch(gemv_kernel, grid, args, config)
    return p.output()
