import pytest
import torch

from fasq.kmeans import assign, kmeans


def _blobs(B=3, K=8, per=50, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(B, K, d, generator=g) * 10
    pts = centers.repeat_interleave(per, dim=1) + 0.01 * torch.randn(B, K * per, d, generator=g)
    return pts, centers


def test_recovers_separated_clusters():
    pts, centers = _blobs()
    cents = kmeans(pts, 8, iters=30, init="kmeans++", gen=torch.Generator().manual_seed(1))
    # every true center has a learned centroid next to it (batched problems independent)
    assert torch.cdist(centers, cents).min(-1).values.max() < 0.1


def test_lloyd_iterations_reduce_error():
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(2, 2000, 2, generator=g)
    mse = lambda c: assign(pts, c, return_dist=True)[1].mean()  # noqa: E731
    c0 = kmeans(pts, 32, iters=0, init="random", gen=torch.Generator().manual_seed(1))
    c10 = kmeans(pts, 32, iters=10, init="random", gen=torch.Generator().manual_seed(1))
    assert mse(c10) < 0.8 * mse(c0)


def test_assign_is_nearest_centroid():
    g = torch.Generator().manual_seed(0)
    pts, cents = torch.randn(2, 300, 4, generator=g), torch.randn(2, 16, 4, generator=g)
    codes, dist = assign(pts, cents, return_dist=True)
    brute = torch.cdist(pts, cents)
    assert torch.equal(codes, brute.argmin(-1))
    torch.testing.assert_close(dist, brute.min(-1).values ** 2, atol=1e-4, rtol=1e-4)


def test_assign_chunking_matches(monkeypatch):
    import fasq.kmeans as km

    pts, _ = _blobs(B=2, per=40)
    cents = pts[:, :8].clone()
    full = assign(pts, cents)
    monkeypatch.setattr(km, "DIST_BLOCK_ELEMS", 16)  # forces many tiny chunks
    assert torch.equal(assign(pts, cents), full)


def test_deterministic_for_seed():
    pts, _ = _blobs(seed=3)
    a = kmeans(pts, 8, iters=5, gen=torch.Generator().manual_seed(7))
    b = kmeans(pts, 8, iters=5, gen=torch.Generator().manual_seed(7))
    c = kmeans(pts, 8, iters=5, gen=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_empty_clusters_are_reseeded():
    # 3 distinct points, many duplicates, K=3 with random init drawing duplicates:
    # every centroid must end on a distinct point.
    pts = torch.tensor([[0.0, 0.0]] * 20 + [[5.0, 5.0]] * 20 + [[-5.0, 5.0]] * 2)[None]
    for seed in range(5):
        cents = kmeans(pts, 3, iters=10, init="random", gen=torch.Generator().manual_seed(seed))
        assert torch.cdist(pts[0, [0, 20, 40]], cents[0]).min(-1).values.max() < 1e-5


def test_more_centroids_than_points_is_an_error():
    with pytest.raises(ValueError, match="at least K=16 points"):
        kmeans(torch.randn(1, 10, 2), 16)
