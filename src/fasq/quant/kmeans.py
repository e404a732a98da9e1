"""Batched k-means in torch (CPU or CUDA), memory bounded by chunking.

All functions work on a batch of B independent problems at once (one per codebook):
    points:    [B, N, d]
    centroids: [B, K, d]
    codes:     [B, N]  (int64)
Determinism: every random choice comes from the `torch.Generator` passed in.

Backends: CPU tensors use the fasq C library (`kernels/cpu/kmeans.py`: assignment with the
scores kept in registers, ~10x faster than the torch code on a d=2 problem, and k-means++
seeding) when it is available; other devices, and `backend="torch"`, run the torch code
below. Both pick the same nearest centroid up to floating-point rounding of near ties.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels.cpu import kmeans as cpu_kmeans

# Largest [B, chunk, K] distance block materialised at once (float32 elements): ~1 MB on
# the CPU (stays in cache; measured faster than 1 << 24), 256 MB on a GPU (few launches).
DIST_BLOCK_ELEMS = 1 << 18
DIST_BLOCK_ELEMS_GPU = 1 << 26
BACKENDS = ("auto", "torch", "library")


def _chunk_rows(B: int, K: int, device: torch.device) -> int:
    block = DIST_BLOCK_ELEMS if device.type == "cpu" else DIST_BLOCK_ELEMS_GPU
    return max(1, block // max(1, B * K))


def _library(points: Tensor, backend: str):
    """The CPU library's k-means module when it should run this call on `points`, else None."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown k-means backend {backend!r}; choose one of {BACKENDS}")
    if points.device.type != "cpu" and backend != "torch":
        if backend == "library":
            raise ValueError("the k-means library backend runs on CPU tensors only")
        return None
    return _cpu_library(backend)


def _cpu_library(backend: str):
    """The CPU library's k-means module unless `backend` is "torch" or it is unavailable
    (an error then if `backend` is "library")."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown k-means backend {backend!r}; choose one of {BACKENDS}")
    if backend == "torch":
        return None

    if cpu_kmeans.available():
        return cpu_kmeans
    if backend == "library":
        raise RuntimeError("the fasq CPU library is unavailable (see the warning above)")
    return None


def assign(points: Tensor, centroids: Tensor, return_dist: bool = False, backend: str = "auto"):
    """Index of the nearest centroid for every point: codes [B, N] (and squared distances)."""
    lib = _library(points, backend)
    if lib is not None:
        return lib.assign(points, centroids, return_dist)
    B, N, _ = points.shape
    cn = (centroids * centroids).sum(-1)[:, None, :]  # [B, 1, K]
    codes = torch.empty(B, N, dtype=torch.long, device=points.device)
    dist = torch.empty(B, N, dtype=points.dtype, device=points.device) if return_dist else None
    step = _chunk_rows(B, centroids.shape[1], points.device)
    for n0 in range(0, N, step):
        p = points[:, n0:n0 + step]
        # ||p - c||^2 = ||p||^2 - 2 p.c + ||c||^2; ||p||^2 does not change the argmin.
        score = torch.baddbmm(cn, p, centroids.transpose(1, 2), alpha=-2.0)  # [B, n, K]
        best, idx = score.min(-1)
        codes[:, n0:n0 + step] = idx
        if return_dist:
            dist[:, n0:n0 + step] = (best + (p * p).sum(-1)).clamp_min_(0)
    return (codes, dist) if return_dist else codes


# k-means++ seeding is K sequential steps over the points; seeding on a random subset of
# SEED_POINTS_PER_CENTROID * K points keeps it cheap (Lloyd's iterations then use all).
SEED_POINTS_PER_CENTROID = 8


def init_kmeanspp(points: Tensor, K: int, gen: torch.Generator, backend: str = "auto") -> Tensor:
    """k-means++ seeding (D^2 sampling), batched: [B, N, d] -> [B, K, d].

    All random numbers are drawn first (the first centroid's index, one uniform per later
    centroid), so the library and the torch code make the same choices."""
    if points.shape[1] > SEED_POINTS_PER_CENTROID * K:
        keep = torch.randperm(points.shape[1], generator=gen)[:SEED_POINTS_PER_CENTROID * K]
        points = points[:, keep.to(points.device)]
    B, N, d = points.shape
    first = torch.randint(N, (B,), generator=gen)
    u = torch.rand(B, K, generator=gen, dtype=torch.float64)
    # K sequential steps of small kernels are launch-bound on a GPU: the seeding points
    # (8 K per problem) go to the CPU library, which makes the same choices.
    lib = _cpu_library(backend)  # whatever device the points are on
    if lib is not None:
        return lib.kmeanspp(points.cpu(), K, first, u).to(points.device, points.dtype)
    return _kmeanspp_torch(points, K, first.to(points.device), u.to(points.device))


SEED_BLOCK = 256  # as in csrc/kmeans_cpu.cpp


def _kmeanspp_torch(points: Tensor, K: int, first: Tensor, u: Tensor) -> Tensor:
    """The library's procedure (csrc/kmeans_cpu.cpp, seed_one) in torch: fp32 squared
    distances to the nearest chosen centroid, summed in double per block of SEED_BLOCK
    points; a draw u * total picks the block, then the point inside it."""
    B, N, d = points.shape
    nblk = -(-N // SEED_BLOCK)
    ar = torch.arange(B, device=points.device)
    cents = torch.empty(B, K, d, dtype=points.dtype, device=points.device)
    cents[:, 0] = points[ar, first]
    mind = torch.zeros(B, nblk * SEED_BLOCK, dtype=torch.float32, device=points.device)
    mind[:, :N] = ((points - cents[:, :1]) ** 2).sum(-1)
    for k in range(1, K):
        blocks = mind.view(B, nblk, SEED_BLOCK).double()
        cb = blocks.sum(-1).cumsum(-1)  # [B, nblk]
        total = cb[:, -1]
        target = u[:, k] * total
        blk = torch.searchsorted(cb, target[:, None], right=True)[:, 0].clamp_(max=nblk - 1)
        before = torch.where(blk > 0, cb[ar, (blk - 1).clamp(min=0)], torch.zeros_like(total))
        inside = blocks[ar, blk].cumsum(-1) + before[:, None]  # [B, SEED_BLOCK]
        at = torch.searchsorted(inside, target[:, None], right=True)[:, 0]
        last = torch.where(blocks[ar, blk] > 0, torch.arange(SEED_BLOCK, device=points.device), -1).amax(-1)
        at = torch.where(at < SEED_BLOCK, at, last.clamp(min=0))  # rounding left the block short
        pick = torch.where(total > 0, blk * SEED_BLOCK + at, (u[:, k] * N).long()).clamp_(max=N - 1)
        cents[:, k] = points[ar, pick]
        mind[:, :N] = torch.minimum(mind[:, :N], ((points - cents[:, k:k + 1]) ** 2).sum(-1))
    return cents


def init_random(points: Tensor, K: int, gen: torch.Generator) -> Tensor:
    """K distinct random points per problem."""
    B, N, _ = points.shape
    idx = torch.randperm(N, generator=gen, device=gen.device)[:K].to(points.device)
    return points[:, idx].clone()


def _update(points: Tensor, codes: Tensor, K: int) -> tuple[Tensor, Tensor]:
    """Per-cluster sums [B, K, d] and counts [B, K]."""
    B, N, d = points.shape
    flat = (codes + torch.arange(B, device=codes.device)[:, None] * K).reshape(-1)
    sums = torch.zeros(B * K, d, dtype=points.dtype, device=points.device)
    sums.index_add_(0, flat, points.reshape(-1, d))
    counts = torch.bincount(flat, minlength=B * K).to(points.dtype)
    return sums.view(B, K, d), counts.view(B, K)


def _reseed_empty(points: Tensor, cents: Tensor, counts: Tensor, dist: Tensor) -> None:
    """Move empty clusters onto the points worst served by their centroid (in place)."""
    for b in torch.nonzero((counts == 0).any(-1))[:, 0].tolist():
        empty = torch.nonzero(counts[b] == 0)[:, 0]
        far = dist[b].topk(min(len(empty), dist.shape[1])).indices
        cents[b, empty[:len(far)]] = points[b, far]
        dist[b, far] = 0  # do not hand the same point to two clusters


def kmeans(points: Tensor, K: int, iters: int = 12, init: str = "kmeans++",
           gen: torch.Generator | None = None, tol: float = 0.0, backend: str = "auto") -> Tensor:
    """Lloyd's algorithm on B problems at once: points [B, N, d] -> centroids [B, K, d].

    Empty clusters are re-seeded with the farthest points. Stops early when the mean
    squared error improves by less than `tol` (relative).
    """
    B, N, d = points.shape
    if K > N:
        raise ValueError(f"k-means needs at least K={K} points per codebook, got {N}")
    gen = gen or torch.Generator().manual_seed(0)
    points = points.float()
    cents = init_kmeanspp(points, K, gen, backend) if init == "kmeans++" else init_random(points, K, gen)
    prev = None
    for _ in range(iters):
        codes, dist = assign(points, cents, return_dist=True, backend=backend)
        sums, counts = _update(points, codes, K)
        cents = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], cents)
        if (counts == 0).any():
            _reseed_empty(points, cents, counts, dist)
        err = dist.mean().item()
        if prev is not None and prev - err <= tol * prev:
            break
        prev = err
    return cents


# --- importance-weighted k-means --------------------------------------------------------------
#
# Points come in subspaces whose coordinates share weights: points [B, S, N, d] (B codebooks,
# S subspaces per codebook, N points each) and weights [B, S, d] (one per coordinate of a
# subspace: the importance of the input column it holds). The distance of point p in
# subspace s to centroid c is sum_j w[s, j] (p_j - c_j)^2. Scaling a subspace's points and the
# codebook by sqrt(w[s]) makes it Euclidean, so the assignment runs as B * S plain problems
# (the CPU library's, when available) on the scaled copies; the update is the weighted mean
# per coordinate. With equal weights it is plain k-means on the same points.


def assign_weighted(points: Tensor, weights: Tensor, centroids: Tensor, return_dist: bool = False,
                    backend: str = "auto"):
    """Nearest centroid under the weighted distance: codes [B, S, N] (and distances)."""
    B, S, N, d = points.shape
    r = weights.float().sqrt()  # [B, S, d]
    p = (points * r[:, :, None, :]).reshape(B * S, N, d)
    c = (centroids[:, None] * r[:, :, None, :]).reshape(B * S, -1, d)
    res = assign(p, c, return_dist=return_dist, backend=backend)
    if return_dist:
        return res[0].view(B, S, N), res[1].view(B, S, N)
    return res.view(B, S, N)


def kmeans_weighted(points: Tensor, weights: Tensor, K: int, iters: int = 12, init: str = "kmeans++",
                    gen: torch.Generator | None = None, backend: str = "auto") -> Tensor:
    """Lloyd's algorithm under per-subspace coordinate weights (see above):
    points [B, S, N, d], weights [B, S, d] > 0 -> centroids [B, K, d].

    Seeding is the plain k-means++ (or random) on all the codebook's points; every
    assignment and update is weighted. A cluster left empty keeps its centroid and is
    re-seeded with the point worst served (weighted distance)."""
    B, S, N, d = points.shape
    if K > S * N:
        raise ValueError(f"k-means needs at least K={K} points per codebook, got {S * N}")
    gen = gen or torch.Generator().manual_seed(0)
    points, weights = points.float(), weights.float()
    flat = points.reshape(B, S * N, d)
    cents = init_kmeanspp(flat, K, gen, backend) if init == "kmeans++" else init_random(flat, K, gen)
    wfull = weights[:, :, None, :].expand(B, S, N, d).reshape(B, S * N, d)
    for _ in range(iters):
        codes, dist = assign_weighted(points, weights, cents, return_dist=True, backend=backend)
        codes, dist = codes.reshape(B, S * N), dist.reshape(B, S * N)
        idx = (codes + torch.arange(B, device=codes.device)[:, None] * K).reshape(-1)
        sums = torch.zeros(B * K, d, dtype=points.dtype, device=points.device)
        sums.index_add_(0, idx, (flat * wfull).reshape(-1, d))
        den = torch.zeros(B * K, d, dtype=points.dtype, device=points.device)
        den.index_add_(0, idx, wfull.reshape(-1, d))
        sums, den = sums.view(B, K, d), den.view(B, K, d)
        counts = torch.bincount(idx, minlength=B * K).view(B, K)
        cents = torch.where(den > 0, sums / den.clamp_min(1e-30), cents)
        if (counts == 0).any():
            _reseed_empty(flat, cents, counts, dist)
    return cents
