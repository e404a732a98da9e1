"""Tensor-parallel slicing of fasq layers for vLLM (pure torch: no vLLM needed).

Every layer is split as vLLM splits it (rows for column-parallel, input columns for
row-parallel); the shards' outputs, concatenated or summed, must equal the whole layer's.
"""

import pytest
import torch

from fasq.core.config import PQConfig, RTNConfig
from fasq.core.format import pack_codes
from fasq.core.ops import pq_linear_dequant
from fasq.quant.quantize import quantize_weight
from fasq.integrations.vllm import sharding

CONFIGS = [
    PQConfig(d=2, K=16, codebook_scope="group", codebook_group=8, scale_group=16),  # 4-bit packed codes
    PQConfig(d=4, K=32, codebook_scope="group", codebook_group=4, scale="minmax", scale_group=16),  # 5 bits, offsets
    PQConfig(d=2, K=8, codebook_scope="matrix", scale_group=0),  # one codebook, per-row scales: replicated
    RTNConfig(bits=3, group_size=16),
]


def _layer(cfg, out=24, inp=96):
    W = torch.randn(out, inp, generator=torch.Generator().manual_seed(0))
    t = quantize_weight(W, cfg, name="w")
    packed = pack_codes(t["codes"], cfg.code_bits)
    return t, packed


def _rank_tensors(t, packed, cfg, rows, cols):
    return (sharding.shard_codes(packed, cfg, rows, cols, "w"), sharding.shard_codebooks(t["codebooks"], cols),
            None if t.get("scales") is None else sharding.shard_scales(t["scales"], rows, cols),
            None if t.get("offsets") is None else sharding.shard_scales(t["offsets"], rows, cols))


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.method}-d{c.d}-K{c.K}")
@pytest.mark.parametrize("tp", [1, 2, 3])
def test_row_and_column_shards_rebuild_the_layer(cfg, tp):
    t, packed = _layer(cfg)
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(1))
    full = pq_linear_dequant(x, t["codes"], t["codebooks"], t.get("scales"), t.get("offsets"))
    # column-parallel: every rank takes 24 / tp rows and all input columns
    cols = sharding.input_shard(cfg, 96, 1, 0, "w")
    n = 24 // tp
    ys = [pq_linear_dequant(x, *_rank_tensors(t, packed, cfg, (r * n, n), cols)) for r in range(tp)]
    torch.testing.assert_close(torch.cat(ys, -1), full, rtol=1e-5, atol=1e-5)
    # row-parallel: every rank takes 96 / tp input columns and all rows; results are summed
    y = 0
    for r in range(tp):
        cols = sharding.input_shard(cfg, 96, tp, r, "w")
        xr = x[:, r * 96 // tp:(r + 1) * 96 // tp]
        y = y + pq_linear_dequant(xr, *_rank_tensors(t, packed, cfg, (0, 24), cols))
    torch.testing.assert_close(y, full, rtol=1e-4, atol=1e-4)


def test_rank_shapes_follow_the_codebook_and_scale_groups():
    cfg = PQConfig(d=2, K=16, codebook_scope="group", codebook_group=8, scale_group=16)
    c = sharding.input_shard(cfg, 96, 3, 2, "w")  # columns 64..95 = subspaces 32..47
    assert (c.m0, c.M, c.c0, c.C, c.s0, c.S) == (32, 16, 4, 2, 4, 2)
    m = sharding.input_shard(PQConfig(d=2, K=8, codebook_scope="matrix", scale_group=0), 96, 3, 1, "w")
    assert (m.c0, m.C, m.s0, m.S) == (0, 1, 0, 1)  # the single codebook and row scale, replicated


def test_straddling_codebook_is_a_clear_error():
    # the default model's MLP down_proj: in = 1536, codebooks of 96 subspaces (192 columns)
    cfg = PQConfig(d=2, K=256)
    # 3 shards of 512 columns cut them; 16 shards of 96 columns lie inside one (replicated)
    assert sharding.working_tp_sizes(cfg, 1536) == [1, 2, 4, 8, 16]
    with pytest.raises(sharding.ShardingError) as e:
        sharding.input_shard(cfg, 1536, 3, 0, "model.layers.0.mlp.down_proj")
    msg = str(e.value)
    assert "model.layers.0.mlp.down_proj" in msg and "tensor parallel size 3" in msg
    assert "[1, 2, 4, 8, 16]" in msg and "straddle" in msg and "--tensor-parallel 3" in msg
    # without the model's widths the advice fits this layer: the largest groups up to 96 that
    # divide 512-column shards (64 subspaces, 64 columns)
    assert "(for this layer: --codebook-group 64 --scale-group 64)" in msg
    # with them it fits every layer (o_proj 576 and down_proj 1536 at tp 3): following the
    # per-layer advice used to fail on o_proj next
    with pytest.raises(sharding.ShardingError) as e:
        sharding.input_shard(cfg, 1536, 3, 0, "model.layers.0.mlp.down_proj", widths=(576, 1536))
    assert "(for every layer of this model: --codebook-group 32 --scale-group 64)" in str(e.value)
    fixed = PQConfig(d=2, K=256, codebook_group=32, scale_group=64)
    assert 3 in sharding.working_tp_sizes(fixed, 1536) and 3 in sharding.working_tp_sizes(fixed, 576)
    assert sharding.requantize_hint(RTNConfig(bits=4, group_size=128), 1536, 3) == "--group-size 128"
    assert sharding.requantize_hint(RTNConfig(bits=4, group_size=96), 576, 3) == "--group-size 96"
    assert sharding.requantize_hint(RTNConfig(bits=4, group_size=96), 1536, 3, widths=(576,)) == "--group-size 64"


@pytest.mark.parametrize("cfg", [PQConfig(d=2, K=256), PQConfig(d=4, K=256, codebook_group=50, scale_group=100),
                                 PQConfig(d=1, K=16, scale="minmax", scale_group=40), RTNConfig(bits=4, group_size=96),
                                 PQConfig(d=2, K=64, codebook_scope="matrix", scale_group=0)])
@pytest.mark.parametrize("tp", [2, 3, 4, 6])
def test_fit_config_splits_every_layer_at_the_asked_size(cfg, tp):
    from fasq.quant.tensor_parallel import fit_config, splits

    shapes = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # the default model's q, k/v, gate/up, down
    fitted = fit_config(cfg, shapes, tp)
    assert all(splits(fitted, w, tp) for _, w in shapes)
    for out, w in shapes:
        fitted.check_shape(out, w)
    assert (fitted.d, fitted.K, fitted.method) == (cfg.d, cfg.K, cfg.method)
    if all(splits(cfg, w, tp) for _, w in shapes):
        assert fitted == cfg  # nothing changes when nothing needs to


def test_fit_config_refuses_widths_that_cannot_split():
    from fasq.core.config import ConfigError
    from fasq.quant.tensor_parallel import fit_config

    with pytest.raises(ConfigError, match="cannot be split into 5 shards"):
        fit_config(PQConfig(d=2, K=256), [(576, 576)], 5)


def test_codes_that_do_not_match_the_config_are_refused():
    cfg = PQConfig(d=2, K=16)
    cols = sharding.input_shard(cfg, 96, 1, 0, "w")
    with pytest.raises(sharding.ShardingError, match="checkpoint and config disagree"):
        sharding.shard_codes(torch.zeros(4, 48, dtype=torch.uint8), cfg, (0, 4), cols, "w")  # 8-bit rows
