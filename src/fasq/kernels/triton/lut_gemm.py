"""Prefill GEMM by look-up tables (output-stationary, CUDA cores), split-K.

A program owns a [BLOCK_T tokens x BLOCK_N rows] output tile and one split of the
subspaces. It streams BLOCK_M subspaces at a time; for each it builds on chip the table
LUT[t, m, k] = x[t, m, :] . codebook_m[k, :] (every centroid, d FMAs per entry), then
adds LUT[t, m, codes[n, m]] for every row n of the tile: a gather replaces d
multiply-adds per weight, and the table is shared by BLOCK_N rows.

The table lives in registers and `tl.gather` reads it (Triton lowers a gather across
threads through shared memory). Codebooks larger than BLOCK_K centroids are processed in
chunks of BLOCK_K (a code only hits one chunk; the others are masked), so K = 4096 works
but costs K / BLOCK_K passes: the dispatcher keeps this path to small K.

Overlap: the loads of the next codes / codebook slice are independent of the current
LUT build, so Triton's software pipeliner (num_stages) can issue them early for the
`m0` loop; the LUT build, gather and reduction themselves are serial per step (no
warp specialisation), and the inner K-chunk loop is not pipelined.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import INTERPRET, Problem, launch, may_split, next_pow2, num_sms, split_range, store_output, tune_bench

# Centroids per LUT chunk (LUT = BLOCK_T x BLOCK_M x BLOCK_K fp32 on chip). The
# interpreter uses a smaller chunk so that K = 256 tests exercise chunking.
MAX_BLOCK_K = 128 if INTERPRET else 256


def _configs():
    if INTERPRET:
        return [triton.Config(dict(BLOCK_T=8, BLOCK_N=16, BLOCK_M=4, SPLIT_K=2), num_warps=4)]
    # Small on purpose (compile + tuning time per layer shape); the pruner drops tiles
    # whose LUT does not fit and splits K only while output tiles are scarce.
    out = []
    for bt in (16, 32, 64):
        for bn in (64, 128):
            for bm in (2, 4):
                for sk in (1, 2, 4):
                    out.append(triton.Config(dict(BLOCK_T=bt, BLOCK_N=bn, BLOCK_M=bm, SPLIT_K=sk),
                                             num_warps=4, num_stages=2))
    return out


def _prune(configs, named_args, **kwargs):
    """Fit the LUT and the gathered tile on chip; split K only while tiles are scarce."""
    a = {**named_args, **kwargs}
    T, N, M, BK = a["T"], a["N"], a["M"], a["BLOCK_K"]
    sms = num_sms(a["y_ptr"].device)
    keep = []
    for c in configs:
        k = c.kwargs
        if k["BLOCK_T"] * k["BLOCK_M"] * BK > 16384 or k["BLOCK_T"] * k["BLOCK_N"] * k["BLOCK_M"] > 16384:
            continue
        if k["BLOCK_T"] > max(16, next_pow2(T)) or k["BLOCK_M"] > next_pow2(M):
            continue
        tiles = triton.cdiv(N, k["BLOCK_N"]) * triton.cdiv(T, k["BLOCK_T"])
        if k["SPLIT_K"] > 1 and (tiles >= 2 * sms or M // k["SPLIT_K"] < 4 * k["BLOCK_M"]):
            continue
        keep.append(c)
    return keep or configs[:1]


@triton.autotune(configs=_configs(), key=["T_BUCKET", "N", "M", "K", "C", "D", "MS_ALIGN"],
                 prune_configs_by={"early_config_prune": _prune}, reset_to_zero=["ws_ptr"], do_bench=tune_bench)
@triton.jit
def lut_gemm_kernel(
    x_ptr,  # [T, M*D] activations, row-major
    codes_ptr,  # [N, M] codes, row-major (uint8/int16/int32)
    cb_ptr,  # [C, K, D] codebooks (fp16/bf16/fp32)
    scales_ptr,  # [N, S] (if HAS_SCALES)
    offsets_ptr,  # [N, S] (if HAS_OFFSETS)
    bias_ptr,  # [N] (if HAS_BIAS)
    y_ptr,  # [T, N] output, activation dtype
    ws_ptr,  # [T*N + tiles] fp32 zeros (split-K accumulator)
    lock_ptr,  # [tiles] int32 zeros (split-K arrival counters)
    T, N, M, K, C, MPC, S, MS, T_BUCKET,
    D: tl.constexpr, MS_ALIGN: tl.constexpr, ONE_GROUP: tl.constexpr,
    HAS_SCALES: tl.constexpr, HAS_OFFSETS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_K: tl.constexpr,
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
    PER_BLOCK: tl.constexpr = HAS_SCALES and (ONE_GROUP or MS_ALIGN % BLOCK_M == 0)
    ELEMWISE: tl.constexpr = HAS_SCALES and not PER_BLOCK
    mi = tl.arange(0, BLOCK_M)  # [BM] subspace within the block
    kk0 = tl.arange(0, BLOCK_K)  # [BK] centroid within the chunk
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        m = m0 + mi  # [BM]
        mmask = m < m_hi
        wmask = nmask[:, None] & mmask[None, :]  # [BN, BM]
        xmask = tmask[:, None] & mmask[None, :]  # [BT, BM]
        code = tl.load(codes_ptr + n[:, None] * M + m[None, :], mask=wmask, other=0).to(tl.int32)
        cbase = (m // MPC) * K  # [BM] first centroid of each subspace's codebook
        # xsub[t, m] = sum_j x[t, m, j]: needed for offsets (o * sum of x).
        xsub = tl.zeros([BLOCK_T, BLOCK_M], dtype=tl.float32)
        if HAS_OFFSETS:
            for j in tl.static_range(D):
                xsub += tl.load(x_ptr + t[:, None] * (M * D) + (m * D + j)[None, :], mask=xmask, other=0.0).to(tl.float32)
        if ELEMWISE:
            g = (m // MS)[None, :]  # [1, BM] scale group of each subspace
            s = tl.load(scales_ptr + n[:, None] * S + g, mask=wmask, other=0.0).to(tl.float32)  # [BN, BM]
        part = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + kk0  # [BK]
            cmask = mmask[:, None] & (kk < K)[None, :]  # [BM, BK]
            lut = tl.zeros([BLOCK_T, BLOCK_M, BLOCK_K], dtype=tl.float32)
            for j in tl.static_range(D):
                xj = tl.load(x_ptr + t[:, None] * (M * D) + (m * D + j)[None, :], mask=xmask, other=0.0).to(tl.float32)
                cj = tl.load(cb_ptr + (cbase[:, None] + kk[None, :]) * D + j, mask=cmask, other=0.0).to(tl.float32)
                lut += xj[:, :, None] * cj[None, :, :]
            local = code - k0  # [BN, BM] code's position in this chunk
            hit = (local >= 0) & (local < BLOCK_K)
            idx = mi[None, :] * BLOCK_K + tl.where(hit, local, 0)  # [BN, BM] into flat [BM*BK]
            idx = tl.broadcast_to(tl.reshape(idx, [1, BLOCK_N * BLOCK_M]), [BLOCK_T, BLOCK_N * BLOCK_M])
            got = tl.gather(tl.reshape(lut, [BLOCK_T, BLOCK_M * BLOCK_K]), idx, 1)
            got = tl.where(hit[None, :, :], tl.reshape(got, [BLOCK_T, BLOCK_N, BLOCK_M]), 0.0)
            if ELEMWISE:
                got = got * s[None, :, :]
            part += tl.sum(got, axis=2)
        if ELEMWISE and HAS_OFFSETS:
            o = tl.load(offsets_ptr + n[:, None] * S + g, mask=wmask, other=0.0).to(tl.float32)  # [BN, BM]
            part += tl.sum(o[None, :, :] * xsub[:, None, :], axis=2)
        if PER_BLOCK:
            g0 = m0 // MS
            part = part * tl.load(scales_ptr + n * S + g0, mask=nmask, other=0.0).to(tl.float32)[None, :]
            if HAS_OFFSETS:
                ob = tl.load(offsets_ptr + n * S + g0, mask=nmask, other=0.0).to(tl.float32)  # [BN]
                part += ob[None, :] * tl.sum(xsub, axis=1)[:, None]
        acc += part
    tile = pid_t * tl.cdiv(N, BLOCK_N) + pid_n
    store_output(acc, y_ptr, ws_ptr, lock_ptr, bias_ptr, t, n, T, N, tile, HAS_BIAS, SPLIT_K)


def lut_gemm(x, codes, codebooks, scales=None, offsets=None, bias=None, config: dict | None = None, out=None):
    """y[..., out] = x[..., in] @ W.T + bias with the LUT GEMM."""
    p = Problem(x, codes, codebooks, scales, offsets, bias, out)
    if p.T == 0:
        return p.output()
    # Counters for the smallest tiles any config uses (8 tokens x 16 rows).
    split = may_split(lut_gemm_kernel, config, triton.cdiv(p.N, 256) * triton.cdiv(p.T, 64), p.x.device)
    ws, locks = p.workspace(triton.cdiv(p.N, 16) * triton.cdiv(p.T, 8), split)
    args = dict(x_ptr=p.x, codes_ptr=p.codes, cb_ptr=p.codebooks, scales_ptr=p.scales, offsets_ptr=p.offsets,
                bias_ptr=p.bias, y_ptr=p.y, ws_ptr=ws, lock_ptr=locks, T=p.T, N=p.N, M=p.M, K=p.K, C=p.C,
                MPC=p.MPC, S=p.S, T_BUCKET=min(next_pow2(p.T), 4096), BLOCK_K=min(MAX_BLOCK_K, next_pow2(p.K)),
                **p.flags())
    grid = lambda meta: (triton.cdiv(p.N, meta["BLOCK_N"]), triton.cdiv(p.T, meta["BLOCK_T"]),  # noqa: E731
                         meta["SPLIT_K"])
    launch(lut_gemm_kernel, grid, args, config)
    return p.output()
