import pytest
import torch
from conftest import STRICT, require

from fasq.quant.kmeans import assign, kmeans


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
    import fasq.quant.kmeans as km

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


# --- the CPU library backend (kernels/cpu_kmeans.py) against the torch code --------------

cpu = require("fasq.kernels.cpu.library")
# under FASQ_STRICT (make test) the library must build: these tests then fail instead of skipping
needs_library = pytest.mark.skipif(not (STRICT or cpu.available()), reason="no C++ compiler for the fasq CPU library")


def _chosen_is_nearest(pts, cents, codes, dist):
    exact = torch.cdist(pts.double(), cents.double()).pow(2)  # [B, N, K]
    best = exact.min(-1).values
    chosen = exact.gather(2, codes[..., None])[..., 0]
    # near ties may go either way in fp32; the chosen centroid is never measurably worse
    assert (chosen - best).abs().max().item() <= 1e-4 * max(1.0, best.max().item())
    torch.testing.assert_close(dist.double(), best, atol=1e-3, rtol=1e-4)


@needs_library
@pytest.mark.parametrize("isa", cpu.ISAS)
@pytest.mark.parametrize("d", [1, 2, 3, 4, 5, 8, 16])
@pytest.mark.parametrize("K", [1, 17, 256, 4096])
@pytest.mark.parametrize("N", [1, 1001])
def test_library_assign_is_nearest(isa, d, K, N):
    g = torch.Generator().manual_seed(d * 1000 + K + N)
    pts, cents = torch.randn(2, N, d, generator=g), torch.randn(2, K, d, generator=g)
    with cpu.limit_isa(isa):
        codes, dist = assign(pts, cents, return_dist=True, backend="library")
        assert torch.equal(assign(pts, cents, backend="library"), codes)
    assert codes.dtype == torch.long and codes.shape == (2, N)
    assert 0 <= codes.min() and codes.max() < K
    _chosen_is_nearest(pts, cents, codes, dist)


@needs_library
def test_library_assign_first_index_on_exact_ties():
    cents = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]] * 8])  # K=32, duplicates
    pts = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]])
    for isa in cpu.ISAS:
        with cpu.limit_isa(isa):
            assert assign(pts, cents, backend="library").tolist() == [[0, 1, 0]]
    assert assign(pts, cents, backend="torch")[0, :2].tolist() == [0, 1]


@needs_library
def test_library_assign_matches_torch_on_weights_like_data():
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(3, 20000, 2, generator=g) * torch.tensor([1.0, 0.3])
    cents = kmeans(pts, 256, iters=3, gen=torch.Generator().manual_seed(1), backend="torch")
    a = assign(pts, cents, backend="library")
    b = assign(pts, cents, backend="torch")
    assert (a != b).float().mean().item() < 1e-3  # only fp32 near ties may differ


@needs_library
@pytest.mark.parametrize("d", [1, 2, 4])
def test_kmeanspp_same_choices_on_both_backends(d):
    pts = torch.randn(3, 3000, d, generator=torch.Generator().manual_seed(d))
    pts[1] = 0.25  # one problem of identical points: uniform sampling
    a = kmeans(pts, 64, iters=0, gen=torch.Generator().manual_seed(5), backend="library")
    b = kmeans(pts, 64, iters=0, gen=torch.Generator().manual_seed(5), backend="torch")
    assert torch.equal(a, b)
    assert len({tuple(r) for r in a[0].tolist()}) == 64  # D^2 sampling never repeats a point


@needs_library
def test_library_kmeans_fits_as_well_as_torch():
    pts, centers = _blobs(B=2, K=16, per=40, d=3, seed=4)
    lib = kmeans(pts, 16, iters=20, gen=torch.Generator().manual_seed(2), backend="library")
    ref = kmeans(pts, 16, iters=20, gen=torch.Generator().manual_seed(2), backend="torch")
    mse = lambda c: assign(pts, c, return_dist=True, backend="torch")[1].mean().item()  # noqa: E731
    assert mse(lib) <= 1.01 * mse(ref)
    assert torch.cdist(centers, lib).min(-1).values.max() < 0.1


def test_backend_is_validated():
    with pytest.raises(ValueError, match="unknown k-means backend"):
        assign(torch.randn(1, 4, 2), torch.randn(1, 2, 2), backend="numpy")
