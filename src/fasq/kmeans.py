"""Batched k-means in torch (CPU or CUDA), memory bounded by chunking.

All functions work on a batch of B independent problems at once (one per codebook):
    points:    [B, N, d]
    centroids: [B, K, d]
    codes:     [B, N]  (int64)
Determinism: every random choice comes from the `torch.Generator` passed in.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Largest [B, chunk, K] distance block materialised at once (float32 elements).
DIST_BLOCK_ELEMS = 1 << 18  # ~1 MB blocks stay in cache; measured faster than 1 << 24 on CPU


def _chunk_rows(B: int, K: int) -> int:
    return max(1, DIST_BLOCK_ELEMS // max(1, B * K))


def assign(points: Tensor, centroids: Tensor, return_dist: bool = False):
    """Index of the nearest centroid for every point: codes [B, N] (and squared distances)."""
    B, N, _ = points.shape
    cn = (centroids * centroids).sum(-1)[:, None, :]  # [B, 1, K]
    codes = torch.empty(B, N, dtype=torch.long, device=points.device)
    dist = torch.empty(B, N, dtype=points.dtype, device=points.device) if return_dist else None
    step = _chunk_rows(B, centroids.shape[1])
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


def init_kmeanspp(points: Tensor, K: int, gen: torch.Generator) -> Tensor:
    """k-means++ seeding (D^2 sampling), batched: [B, N, d] -> [B, K, d]."""
    if points.shape[1] > SEED_POINTS_PER_CENTROID * K:
        keep = torch.randperm(points.shape[1], generator=gen)[:SEED_POINTS_PER_CENTROID * K]
        points = points[:, keep.to(points.device)]
    B, N, d = points.shape
    ar = torch.arange(B, device=points.device)
    first = torch.randint(N, (B,), generator=gen).to(points.device)
    cents = torch.empty(B, K, d, dtype=points.dtype, device=points.device)
    cents[:, 0] = points[ar, first]
    mind = ((points - cents[:, :1]) ** 2).sum(-1)  # [B, N]
    for k in range(1, K):
        # Sample proportional to squared distance; all-zero rows (duplicates) fall back to uniform.
        w = mind + (mind.sum(-1, keepdim=True) == 0).to(mind.dtype)
        cdf = w.cumsum(-1)
        u = torch.rand(B, 1, generator=gen).to(points.device) * cdf[:, -1:]
        pick = torch.searchsorted(cdf, u)[:, 0].clamp_(max=N - 1)
        cents[:, k] = points[ar, pick]
        torch.minimum(mind, ((points - cents[:, k:k + 1]) ** 2).sum(-1), out=mind)
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
           gen: torch.Generator | None = None, tol: float = 0.0) -> Tensor:
    """Lloyd's algorithm on B problems at once: points [B, N, d] -> centroids [B, K, d].

    Empty clusters are re-seeded with the farthest points. Stops early when the mean
    squared error improves by less than `tol` (relative).
    """
    B, N, d = points.shape
    if K > N:
        raise ValueError(f"k-means needs at least K={K} points per codebook, got {N}")
    gen = gen or torch.Generator().manual_seed(0)
    points = points.float()
    cents = (init_kmeanspp if init == "kmeans++" else init_random)(points, K, gen)
    prev = None
    for _ in range(iters):
        codes, dist = assign(points, cents, return_dist=True)
        sums, counts = _update(points, codes, K)
        cents = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], cents)
        if (counts == 0).any():
            _reseed_empty(points, cents, counts, dist)
        err = dist.mean().item()
        if prev is not None and prev - err <= tol * prev:
            break
        prev = err
    return cents
