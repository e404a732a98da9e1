"""Data-free input-channel importance (fasq.quant.importance) and importance-weighted PQ."""

import builtins
import io
import os

import pytest
import torch

from fasq.quant import importance
from fasq.core.config import ConfigError, PQConfig, QuantConfig
from fasq.quant.kmeans import assign_weighted, kmeans, kmeans_weighted
from fasq.core.convert import quantizable_linears
from fasq.core.ops import dequantize
from fasq.quant.quantize import quantize_pq


def _names(model):
    return [n for n, _ in quantizable_linears(model, QuantConfig())]


@pytest.mark.parametrize("method", importance.ESTIMATES)
def test_estimate_is_deterministic_and_reads_no_file(tiny_llama, method, monkeypatch, tmp_path):
    """No text, no dataset: every file opening fails while it runs, the data folder points
    nowhere, and two runs give the same weights."""
    monkeypatch.setenv("FASQ_DATA_DIR", str(tmp_path / "no-data-here"))
    opened = []

    def refuse(*a, **k):
        opened.append(a[0] if a else k)
        raise AssertionError(f"the importance estimate opened a file: {a[0] if a else k}")

    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr(io, "open", refuse)
    monkeypatch.setattr(os, "open", refuse)
    names = _names(tiny_llama)
    a = importance.estimate(tiny_llama, method, names)
    b = importance.estimate(tiny_llama, method, names)
    monkeypatch.undo()
    assert not opened
    assert set(a) == set(names)
    for n in names:
        assert torch.equal(a[n], b[n])
        assert a[n].shape == (tiny_llama.get_submodule(n).in_features,)
        assert torch.isfinite(a[n]).all() and (a[n] > 0).all()
        assert a[n].mean().item() == pytest.approx(1.0, rel=0.05)


def test_random_tokens_find_a_massive_input_channel(tiny_llama):
    """A channel the model amplifies (here: one column of up_proj scaled up) dominates the
    down_proj input statistics and so its column weight."""
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.up_proj.weight[7] *= 50
    imp = importance.estimate(tiny_llama, "random-tokens", ["model.layers.1.mlp.down_proj"])
    w = imp["model.layers.1.mlp.down_proj"]
    assert w.argmax().item() == 7 and w[7] > 20 * w.median()


def test_random_token_stats_depend_on_the_model_not_on_chance(tiny_llama):
    names = ["model.layers.0.self_attn.o_proj"]
    a = importance.random_token_stats(tiny_llama, names)[names[0]]
    b = importance.random_token_stats(tiny_llama, names, seed=1)[names[0]]
    assert not torch.equal(a, b)  # another draw of ids: other values...
    assert torch.corrcoef(torch.stack([a.log(), b.log()]))[0, 1] > 0.5  # ...of the same profile


def test_norm_estimate_is_the_squared_norm_weight(tiny_llama):
    with torch.no_grad():
        tiny_llama.model.layers[0].input_layernorm.weight.copy_(torch.linspace(0.5, 2.0, 64))
    st = importance.norm_stats(tiny_llama, _names(tiny_llama))
    torch.testing.assert_close(st["model.layers.0.self_attn.k_proj"], torch.linspace(0.5, 2.0, 64) ** 2)
    assert torch.equal(st["model.layers.0.mlp.down_proj"], torch.ones(96))  # no norm in front


def test_weighted_kmeans_with_equal_weights_is_plain_kmeans():
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(2, 4, 300, 2, generator=g)
    ones = torch.ones(2, 4, 2)
    cw = kmeans_weighted(pts, ones, 16, iters=5, gen=torch.Generator().manual_seed(1))
    cp = kmeans(pts.reshape(2, 1200, 2), 16, iters=5, gen=torch.Generator().manual_seed(1))
    torch.testing.assert_close(cw, cp, rtol=1e-5, atol=1e-5)


def test_weighted_assign_is_the_weighted_nearest_centroid():
    g = torch.Generator().manual_seed(0)
    pts, cents = torch.randn(2, 3, 50, 2, generator=g), torch.randn(2, 8, 2, generator=g)
    w = torch.rand(2, 3, 2, generator=g) * 10 + 0.01
    codes = assign_weighted(pts, w, cents)
    d = ((pts[:, :, :, None, :] - cents[:, None, None]) ** 2 * w[:, :, None, None, :]).sum(-1)
    assert torch.equal(codes, d.argmin(-1))


def test_importance_lowers_the_weighted_error_it_targets():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(128, 384, generator=g)
    imp = torch.ones(384)
    imp[5], imp[200:204] = 500.0, 30.0
    cfg = PQConfig(d=2, K=64, codebook_group=48, scale_group=96)

    def errors(im):
        t = quantize_pq(W, cfg, importance=im)
        e = (W - dequantize(t["codes"], t["codebooks"], t["scales"], t["offsets"], dtype=torch.float32)) ** 2
        return (e * imp).sum().item(), e.sum().item()

    (wp, pp), (wi, pi) = errors(None), errors(imp)
    assert wi < 0.7 * wp  # the weighted error falls
    assert pi < 1.2 * pp  # at a small cost in plain error
    u_w, u_p = errors(torch.ones(384))  # equal weights: the plain objective
    assert u_p < 1.05 * pp


def test_importance_setting_is_validated_and_saved():
    with pytest.raises(ConfigError, match="importance"):
        QuantConfig(importance="wikitext")
    q = QuantConfig(importance="random-tokens")
    assert QuantConfig.from_dict(q.to_dict()).importance == "random-tokens"
    d = q.to_dict()
    del d["importance"]  # checkpoints written before the setting existed
    assert QuantConfig.from_dict(d).importance == "none"
    with pytest.raises(ValueError, match="positive"):
        quantize_pq(torch.randn(32, 64), PQConfig(d=2, K=16, codebook_group=8, scale_group=16),
                    importance=torch.zeros(64))


def test_block_by_block_pass_gives_the_whole_models_statistics(tiny_dir):
    """The streaming pipeline's forward pass (one block's weights in memory at a time)."""
    from fasq.io.sources import load_model
    from fasq.stream import make_plan

    plan = make_plan(str(tiny_dir), QuantConfig())
    a = importance.random_token_stats_layerwise(plan.config, plan.reader, plan.modules)
    model, _ = load_model(str(tiny_dir))
    b = importance.random_token_stats(model, plan.modules)
    assert set(a) == set(plan.modules) and all(torch.equal(a[n], b[n]) for n in plan.modules)
