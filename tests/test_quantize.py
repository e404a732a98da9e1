import math

import pytest
import torch

from fasq.core import ops
from fasq.core.config import ConfigError, PQConfig, RTNConfig
from fasq.quant.quantize import error_report, quantize_pq, quantize_rtn, quantize_weight


def _dequant(t):
    return ops.dequantize(t["codes"], t["codebooks"], t["scales"], t["offsets"], dtype=torch.float32)


@pytest.mark.parametrize("scope,group", [("matrix", 0), ("group", 4), ("subspace", 0)])
@pytest.mark.parametrize("d", [1, 2, 4])
def test_round_trip_exact_when_weights_are_codebook_points(scope, group, d):
    # Every sub-vector is one of 8 fp16 points per codebook: PQ with K=8 and no scales
    # must reproduce W exactly (encode -> decode round trip).
    g = torch.Generator().manual_seed(d)
    out, n, K = 40, 32, 8
    cfg = PQConfig(d=d, K=K, codebook_scope=scope, codebook_group=group, scale="none", kmeans_iters=20)
    C = cfg.num_codebooks(n)
    pts = torch.randn(C, K, d, generator=g).half().float()
    codes = torch.randint(0, K, (out, n // d), generator=g)
    W = ops.dequantize(codes, pts)  # [out, n]
    t = quantize_pq(W, cfg)
    assert t["codes"].shape == (out, n // d) and t["codebooks"].shape == (C, K, d)
    assert torch.equal(_dequant(t), W)


@pytest.mark.parametrize("scale", ["absmax", "rms", "minmax"])
@pytest.mark.parametrize("scale_group", [0, 8])
def test_scales_shapes_and_quality(scale, scale_group):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 48, generator=g) * torch.logspace(-2, 1, 64)[:, None]  # very different row norms
    t = quantize_pq(W, PQConfig(d=2, K=64, scale=scale, scale_group=scale_group))
    S = 48 // scale_group if scale_group else 1
    assert t["scales"].shape == (64, S) and t["scales"].dtype == torch.float16
    assert (t["offsets"] is not None) == (scale == "minmax")
    err = error_report(W, _dequant(t))
    assert err["sqnr_db"] > 12  # 3 bits per weight on Gaussian rows: about 15-18 dB
    # without scales the small rows are lost entirely
    t0 = quantize_pq(W, PQConfig(d=2, K=64, scale="none"))
    small = slice(0, 16)
    e_scaled = error_report(W[small], _dequant(t)[small])["rel_error"]
    e_plain = error_report(W[small], _dequant(t0)[small])["rel_error"]
    assert e_scaled < 0.5 * e_plain


def test_pq_error_falls_with_more_centroids():
    W = torch.randn(128, 64, generator=torch.Generator().manual_seed(1))
    errs = [error_report(W, _dequant(quantize_pq(W, PQConfig(d=2, K=K))))["rel_error"] for K in (4, 16, 64, 256)]
    assert errs == sorted(errs, reverse=True)


def test_pq_is_deterministic_for_a_seed():
    W = torch.randn(96, 64, generator=torch.Generator().manual_seed(2))
    a = quantize_pq(W, PQConfig(d=2, K=32, kmeans_sample=1000, seed=5))
    b = quantize_pq(W, PQConfig(d=2, K=32, kmeans_sample=1000, seed=5))
    c = quantize_pq(W, PQConfig(d=2, K=32, kmeans_sample=1000, seed=6))
    assert all(torch.equal(a[k], b[k]) for k in ("codes", "codebooks", "scales"))
    assert not torch.equal(a["codebooks"], c["codebooks"])


def test_rtn_lossless_on_grid_and_bounded_error():
    g = torch.Generator().manual_seed(3)
    # weights already on a 4-bit grid per group of 16: RTN 4-bit g16 reproduces them
    q = torch.randint(0, 16, (8, 64), generator=g).float()
    q[:, ::16], q[:, 1::16] = 0, 15  # each group spans the full grid
    scale = (torch.rand(8, 4, generator=g) + 0.5).half().float().repeat_interleave(16, 1)
    lo = torch.randn(8, 4, generator=g).half().float().repeat_interleave(16, 1)
    W = q * scale + lo
    t = quantize_rtn(W, RTNConfig(bits=4, group_size=16))
    torch.testing.assert_close(_dequant(t), W, atol=2e-3, rtol=1e-3)
    # random weights: error at most half a step (plus fp16 rounding of scale/min)
    W = torch.randn(32, 64, generator=g)
    t = quantize_rtn(W, RTNConfig(bits=3, group_size=32))
    step = t["scales"].float().repeat_interleave(32, 1)
    assert ((_dequant(t) - W).abs() <= 0.5 * step + 1e-2).all()
    assert t["codes"].max() <= 7


def test_bad_shapes_and_values_are_clear_errors():
    W = torch.randn(16, 30)
    with pytest.raises(ConfigError, match="in_features=30 is not divisible by d=4"):
        quantize_pq(W, PQConfig(d=4, K=4))
    with pytest.raises(ConfigError, match="K=256 is larger than the 240 sub-vectors"):
        quantize_pq(W, PQConfig(d=2, K=256))
    with pytest.raises(ConfigError, match="not divisible by RTN group_size=64"):
        quantize_rtn(W, RTNConfig(bits=4, group_size=64))
    for bad in (math.nan, math.inf):
        W2 = torch.randn(16, 32)
        W2[3, 5] = bad
        with pytest.raises(ValueError, match="layer.q: weight has 1 NaN/Inf"):
            quantize_weight(W2, PQConfig(d=2, K=4), name="layer.q")


@pytest.mark.parametrize("kwargs,match", [
    (dict(K=100), "power of two"),
    (dict(K=1), "power of two"),
    (dict(K=131072), "power of two"),
    (dict(d=0), "d .sub-vector length."),
    (dict(codebook_scope="row"), "codebook_scope"),
    (dict(codebook_scope="group", codebook_group=0), "codebook_group >= 1"),
    (dict(scale="max"), "scale must be one of"),
    (dict(scale_group=-1), "scale_group must be"),
    (dict(kmeans_init="pp"), "kmeans_init"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PQConfig(**kwargs)


def test_scale_group_fits_every_width():
    cfg = PQConfig(d=2, K=256, scale_group=96)
    sizes = {n: cfg.scale_group_size(n) for n in (576, 1536, 4096, 14336, 30, 96)}
    assert sizes == {576: 96, 1536: 96, 4096: 128, 14336: 112, 30: 30, 96: 96}
    assert PQConfig(d=4, scale_group=6).scale_group_size(48) == 8  # a multiple of d
    assert PQConfig(scale_group=0).scale_group_size(576) == 576


def test_codebook_group_fits_every_width():
    cfg = PQConfig(d=2, K=256, codebook_scope="group", codebook_group=96)
    spans = {n: cfg.codebook_span(n) for n in (576, 1536, 4096, 14336, 62)}
    assert spans == {576: 96, 1536: 96, 4096: 128, 14336: 112, 62: 31}
    assert cfg.num_codebooks(1536) == 8 and cfg.num_codebooks(62) == 1
    assert PQConfig(codebook_scope="matrix").num_codebooks(576) == 1
    assert PQConfig(codebook_scope="subspace").num_codebooks(576) == 288
