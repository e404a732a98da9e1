"""k-means on the CPU through the fasq library (csrc/kmeans_cpu.cpp): the nearest-centroid
assignment and k-means++ seeding that `fasq.quant.kmeans` uses for CPU tensors.

Same arguments as the torch versions in `fasq.quant.kmeans` (batched, B problems):
    points    [B, N, d] fp32     centroids [B, K, d] fp32     codes [B, N] int64
`available()` is False (and `fasq.quant.kmeans` keeps its torch code) when the library cannot be
built; the library itself warns once, as for the pq_linear kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import library as cpu


def available() -> bool:
    return cpu.load_library() is not None


def _check(err: int, what: str) -> None:
    if err:
        raise ValueError(f"fasq CPU k-means ({what}): invalid sizes")


def _f32(t: Tensor) -> Tensor:
    return t.to(torch.float32).contiguous()


def assign(points: Tensor, centroids: Tensor, return_dist: bool = False):
    """Nearest centroid of every point: codes [B, N] (and squared distances [B, N])."""
    points, centroids = _f32(points), _f32(centroids)
    B, N, d = points.shape
    if centroids.shape[0] != B or centroids.shape[2] != d:
        raise ValueError(f"points {tuple(points.shape)} and centroids {tuple(centroids.shape)} disagree")
    codes = torch.empty(B, N, dtype=torch.long)
    dist = torch.empty(B, N, dtype=torch.float32) if return_dist else None
    err = cpu.load_library().fasq_cpu_kmeans_assign(
        points.data_ptr(), centroids.data_ptr(), B, N, centroids.shape[1], d, codes.data_ptr(),
        None if dist is None else dist.data_ptr(), torch.get_num_threads())
    _check(err, "assign")
    return (codes, dist) if return_dist else codes


def kmeanspp(points: Tensor, K: int, first: Tensor, u: Tensor) -> Tensor:
    """k-means++ seeding: [B, N, d] -> [B, K, d]. first [B] int64: the first centroid's point;
    u [B, K] float64 uniforms in [0, 1) (u[:, 0] unused) drive the D^2 sampling."""
    points = _f32(points)
    B, N, d = points.shape
    first, u = first.to(torch.int64).contiguous(), u.to(torch.float64).contiguous()
    cents = torch.empty(B, K, d, dtype=torch.float32)
    err = cpu.load_library().fasq_cpu_kmeanspp(points.data_ptr(), B, N, K, d, first.data_ptr(), u.data_ptr(),
                                               cents.data_ptr(), torch.get_num_threads())
    _check(err, "kmeans++")
    return cents
