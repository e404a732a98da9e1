"""Tensor-parallel slicing of fasq layers: pure torch, no vLLM (unit-tested on its own).

A fasq layer W[out, in] is stored as codes [out, M] (M = in / d subspaces, bit-packed on
disk), codebooks [C, K, d] (codebook c serves `span` = M / C consecutive subspaces, shared
by all rows) and scales/offsets [out, S] (one per row and group of `in / S` columns).

- Column parallelism splits `out`: each rank takes its rows of codes, scales and offsets,
  and keeps every codebook.
- Row parallelism splits `in`: each rank takes a run of subspaces (columns of codes), the
  codebooks serving them and the scale groups covering them (when that works: see
  `fasq.quant.tensor_parallel`); anything else would need a codebook or scale group cut in two:
  `ShardingError` says which sizes and settings work.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...core.config import ConfigError, LayerConfig
from ...core.format import packed_row_bytes, unpack_codes
from ...core.ops import code_dtype
from ...quant.tensor_parallel import InputShard, fit_config, group_options, input_shard_or_reason, working_tp_sizes

__all__ = ["InputShard", "ShardingError", "input_shard", "requantize_hint", "shard_codebooks", "shard_codes",
           "shard_scales", "working_tp_sizes"]

class ShardingError(ValueError):
    """A fasq layer cannot be split at the requested tensor-parallel size."""


def requantize_hint(cfg: LayerConfig, in_features: int, tp_size: int, widths=()) -> str:
    """`fasq quantize` options whose codebooks and scale groups fit shards of in / tp columns,
    in this layer and in every layer of `widths` (the model's input widths, when known)."""
    try:
        fitted = fit_config(cfg, [(None, w) for w in {in_features, *widths}], tp_size)
    except ConfigError as e:
        return str(e)
    return group_options(fitted)


def input_shard(cfg: LayerConfig, in_features: int, tp_size: int, rank: int, name: str,
                widths=()) -> InputShard:
    """This rank's share of the input columns of layer `name`, or a ShardingError that
    names the layer, the reason and the settings that would work (for every layer of
    `widths`, the model's input widths, when known)."""
    shard = input_shard_or_reason(cfg, in_features, tp_size, rank)
    if isinstance(shard, str):
        scope = "every layer of this model" if widths else "this layer"
        raise ShardingError(
            f"fasq layer {name} (in_features={in_features}, {cfg.method} d={cfg.d}) cannot be split "
            f"across its input at tensor parallel size {tp_size}: {shard}, so a codebook or scale "
            f"group would straddle a shard boundary. Tensor parallel sizes that work for this "
            f"layer: {working_tp_sizes(cfg, in_features)}; or re-quantize with "
            f"`fasq quantize SOURCE --tensor-parallel {tp_size}`, which picks codebook and scale groups "
            f"that split every layer (for {scope}: "
            f"{requantize_hint(cfg, in_features, tp_size, widths)})")
    return shard


def shard_codes(packed: Tensor, cfg: LayerConfig, rows: tuple[int, int], cols: InputShard,
                name: str) -> Tensor:
    """Checkpoint codes uint8 [out, bytes] (bit-packed rows) -> this rank's codes [rows, M]
    (unpacked, in PQLinear's dtype). Rows are byte-aligned: slice them before unpacking."""
    expect = packed_row_bytes(cols.M_full, cfg.code_bits)
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != expect:
        raise ShardingError(f"{name}.codes: expected uint8 [out, {expect}] bit-packed codes "
                            f"({cols.M_full} codes of {cfg.code_bits} bits per row), got "
                            f"{packed.dtype} {list(packed.shape)}: checkpoint and config disagree")
    r0, n = rows
    codes = unpack_codes(packed[r0:r0 + n], cfg.code_bits, cols.M_full, code_dtype(cfg.K))
    return codes[:, cols.m0:cols.m0 + cols.M]


def shard_codebooks(codebooks: Tensor, cols: InputShard) -> Tensor:
    """[C_full, K, d] -> the codebooks serving this rank's subspaces, [C, K, d]."""
    return codebooks[cols.c0:cols.c0 + cols.C]


def shard_scales(scales: Tensor, rows: tuple[int, int], cols: InputShard) -> Tensor:
    """scales or offsets [out, S_full] -> this rank's [rows, S]."""
    r0, n = rows
    return scales[r0:r0 + n, cols.s0:cols.s0 + cols.S]
