"""Shared pieces of the Triton kernels: argument preparation, the split-K workspace and
the epilogue (split-K reduction, bias, cast, store).

This module imports triton; `fasq.kernels` only imports it when a kernel is called.

Split-K protocol (all three kernel families): a program owns an output tile
[tokens x rows] and one slice of the reduction (subspaces). With SPLIT_K == 1 it stores
its result directly (bias added, cast to the activation dtype). With SPLIT_K > 1 each
program atomically adds its fp32 partial tile into a zero-initialised fp32 workspace,
then bumps a per-tile counter; the program that arrives last reads the finished fp32
tile back and writes the output. This keeps a call to one memset + one kernel launch
(no separate reduction or cast kernel, which at decode sizes would cost as much as the
GEMV itself), and lets the autotuner time split and unsplit configs fairly: the
workspace is listed in `reset_to_zero`, so it is re-zeroed before every trial and before
the real launch that follows tuning.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Under the interpreter every program is emulated one by one with numpy: autotuning would
# only multiply the test time, so each kernel family uses one small config there.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def tune_bench(kernel_call, quantiles):
    """The autotuner's timer: median of ~25 ms of runs per config (Triton's default spends
    125 ms per config; with ~10-20 configs per (shape, token bucket) key that dominated
    the first call of every new layer shape)."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter/CPU: any small number, only used by heuristics


class Problem:
    """Validated, flattened arguments of one pq_linear call (what every launcher needs)."""

    def __init__(self, x, codes, codebooks, scales, offsets, bias, out=None):
        N, M = codes.shape
        C, K, D = codebooks.shape
        if x.shape[-1] != M * D:
            raise ValueError(f"x has {x.shape[-1]} features, codes/codebooks describe in = {M}*{D}")
        if M % C:
            raise ValueError(f"{C} codebooks do not divide {M} subspaces")
        if offsets is not None and scales is None:
            raise ValueError("offsets need scales")
        S = 1 if scales is None else scales.shape[1]
        if scales is not None and (scales.shape[0] != N or M % S):
            raise ValueError(f"scales {tuple(scales.shape)} do not fit codes {tuple(codes.shape)} (need [out, S], S | M)")
        if codes.dtype not in (torch.uint8, torch.int16, torch.int32):
            raise TypeError(f"codes must be uint8/int16/int32, got {codes.dtype}")
        self.lead = x.shape[:-1]
        self.x = x.reshape(-1, M * D).contiguous()  # [T, in]
        self.T = self.x.shape[0]
        self.N, self.M, self.K, self.D, self.C, self.S = N, M, K, D, C, S
        self.MPC = M // C  # subspaces per codebook
        self.MS = M // S  # subspaces per scale group
        self.codes = codes.contiguous()  # [N, M]
        self.codebooks = codebooks.contiguous()  # [C, K, D]
        # Absent optional tensors are replaced by any valid pointer; the kernel never reads
        # them (HAS_SCALES / HAS_OFFSETS / HAS_BIAS are compile-time flags).
        dummy = self.codebooks
        self.has_scales, self.has_offsets, self.has_bias = scales is not None, offsets is not None, bias is not None
        self.scales = scales.contiguous() if scales is not None else dummy  # [N, S]
        self.offsets = offsets.contiguous() if offsets is not None else dummy  # [N, S]
        self.bias = bias.contiguous() if bias is not None else dummy  # [N]
        if out is None:
            self.y = torch.empty(self.T, N, dtype=x.dtype, device=x.device)  # [T, N]
        else:  # caller's buffer (tests poison it with NaN to catch unwritten outputs)
            if out.dtype != x.dtype or out.numel() != self.T * N or not out.is_contiguous():
                raise ValueError(f"out must be a contiguous {x.dtype} tensor of {self.T}x{N} elements")
            self.y = out.view(self.T, N)

    def workspace(self, max_tiles: int, needed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(ws, locks): ws [T*N + max_tiles] fp32 zeros, the split-K accumulator followed by
        the per-tile counters; locks is that tail viewed as int32 (zero bits are 0 in both
        types, so one memset serves both, and zeroing ws re-zeroes the counters)."""
        if not needed:  # no config can split K: skip the memset (117 MB at 2048 x 14336)
            ws = torch.empty(1, dtype=torch.float32, device=self.x.device)
            return ws, ws.view(torch.int32)
        ws = torch.zeros(self.T * self.N + max_tiles, dtype=torch.float32, device=self.x.device)
        return ws, ws[self.T * self.N:].view(torch.int32)

    def flags(self) -> dict:
        """Compile-time flags shared by all kernels."""
        # MS (subspaces per scale group) is a runtime int, so layers of different widths
        # share compiled kernels; only its alignment (largest power of two dividing it,
        # capped) is compile-time: a BLOCK_M dividing it means no block straddles groups.
        align = 1024 if self.S == 1 else min(1024, self.MS & -self.MS)
        return dict(D=self.D, MS=self.MS, MS_ALIGN=align, ONE_GROUP=self.S == 1, HAS_SCALES=self.has_scales,
                    HAS_OFFSETS=self.has_offsets, HAS_BIAS=self.has_bias)

    def output(self) -> torch.Tensor:
        return self.y.reshape(*self.lead, self.N)


def may_split(kernel, config: dict | None, min_tiles: int, device) -> bool:
    """Whether the launch can run with SPLIT_K > 1, i.e. needs a zeroed workspace: the
    pinned config says so; else the pruners only split when even the largest tiles leave
    fewer than 2 tiles per SM (`min_tiles` = tile count with the largest tiles)."""
    if config is not None:
        return config.get("SPLIT_K", 1) > 1
    if len(kernel.configs) == 1:
        return kernel.configs[0].kwargs["SPLIT_K"] > 1
    return min_tiles < 2 * num_sms(device)


def launch(kernel, grid, args: dict, config: dict | None):
    """Run an autotuned kernel, or (config given) its plain jit function with that config:
    tests use this to pin tile sizes and split-K."""
    if config is None:
        kernel[grid](**args)
    else:
        cfg = dict(config)
        kernel.fn[grid](**args, **cfg)


@triton.jit
def split_range(total, pid_k, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """[lo, hi) of the reduction slice owned by split pid_k; slices are whole BLOCKs, so no
    block straddles two splits (and block starts stay aligned to BLOCK)."""
    per = tl.cdiv(tl.cdiv(total, SPLIT_K), BLOCK) * BLOCK
    lo = pid_k * per
    hi = tl.minimum(total, lo + per)
    return lo, hi


@triton.jit
def _finish(acc, y_ptr, bias_ptr, offs, mask, n, nmask, HAS_BIAS: tl.constexpr):
    # acc: [BT, BN] fp32 full sum; offs/mask: [BT, BN]; n/nmask: [BN]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def store_output(acc, y_ptr, ws_ptr, lock_ptr, bias_ptr, t, n, T, N, tile_id,
                 HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Epilogue. acc: [BT, BN] fp32 partial (this split's) sum; t: [BT] token ids;
    n: [BN] output rows; y: [T, N]; ws: [T*N] fp32 zeros; lock: [tiles] int32 zeros."""
    nmask = n < N
    mask = (t[:, None] < T) & nmask[None, :]
    offs = t[:, None] * N + n[None, :]  # [BT, BN]
    if SPLIT_K == 1:
        _finish(acc, y_ptr, bias_ptr, offs, mask, n, nmask, HAS_BIAS)
    else:
        # Partial sums: relaxed fp32 atomics (performed in L2, order irrelevant).
        tl.atomic_add(ws_ptr + offs, acc, mask=mask, sem="relaxed")
        # All threads' adds are issued before the counter bump (acq_rel, gpu scope) that
        # publishes them; the last arriver then sees every split's contribution.
        tl.debug_barrier()
        arrived = tl.atomic_add(lock_ptr + tile_id, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            # .cg: read from L2, where the atomics landed (L1 is not coherent).
            total = tl.load(ws_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
            _finish(total, y_ptr, bias_ptr, offs, mask, n, nmask, HAS_BIAS)
