"""Tensor-parallel slicing of fasq layers: pure torch, no vLLM (unit-tested on its own).

A fasq layer W[out, in] is stored as codes [out, M] (M = in / d subspaces, bit-packed on
disk), codebooks [C, K, d] (codebook c serves `span` = M / C consecutive subspaces, shared
by all rows) and scales/offsets [out, S] (one per row and group of `in / S` columns).

- Column parallelism splits `out`: each rank takes its rows of codes, scales and offsets,
  and keeps every codebook.
- Row parallelism splits `in`: each rank takes a run of subspaces (columns of codes), the
  codebooks serving them and the scale groups covering them. That works when a shard is
  a whole number of codebooks and scale groups, or lies inside one codebook (scale group),
  which is then replicated (RTN, "matrix" scope, per-row scales). Anything else would need
  a codebook or scale group cut in two: `ShardingError` says which sizes work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import LayerConfig
from ..format import packed_row_bytes, unpack_codes
from ..module import PQLinear
from ..ops import code_dtype

MAX_TP_LISTED = 16  # the tensor-parallel sizes an error message considers


class ShardingError(ValueError):
    """A fasq layer cannot be split at the requested tensor-parallel size."""


@dataclass(frozen=True)
class InputShard:
    """One rank's share of a layer's input columns, in the units of each tensor."""

    d: int
    M_full: int  # subspaces of the whole layer
    m0: int  # first subspace of this rank
    M: int  # subspaces of this rank
    c0: int  # first codebook it uses
    C: int  # codebooks it holds
    s0: int  # first scale group
    S: int  # scale groups it holds (0 without scales)


def _span(cfg: LayerConfig, in_features: int) -> int:
    """Subspaces per codebook."""
    M = in_features // cfg.d
    return M // cfg.num_codebooks(in_features)


def _split(unit: int, part: int, start: int, what: str, units: str) -> tuple[int, int] | str:
    """(first block, blocks) of `unit`-sized blocks covering [start, start + part), when the
    shard is whole blocks or lies inside one (replicated); else the reason it cannot."""
    if part % unit == 0:
        return start // unit, part // unit
    if unit % part == 0:
        return start // unit, 1
    return f"a {what} covers {unit} {units} and a shard {part}"


def _input_shard(cfg: LayerConfig, in_features: int, tp_size: int, rank: int) -> InputShard | str:
    if in_features % tp_size:
        return f"in_features={in_features} is not divisible by {tp_size}"
    part, col0 = in_features // tp_size, rank * (in_features // tp_size)
    if part % cfg.d:
        return f"a shard of {part} columns is not a whole number of d={cfg.d} sub-vectors"
    M_part, m0 = part // cfg.d, col0 // cfg.d
    cb = _split(_span(cfg, in_features), M_part, m0, "codebook", "subspaces")
    if isinstance(cb, str):
        return cb
    has_scales, _ = PQLinear.scale_kinds(cfg)
    sg = (0, 0)
    if has_scales:
        sg = _split(cfg.scale_group_size(in_features), part, col0, "scale group", "columns")
        if isinstance(sg, str):
            return sg
    return InputShard(cfg.d, in_features // cfg.d, m0, M_part, cb[0], cb[1], sg[0], sg[1])


def working_tp_sizes(cfg: LayerConfig, in_features: int) -> list[int]:
    """The row-parallel sizes (up to MAX_TP_LISTED) at which this layer can be split."""
    return [t for t in range(1, MAX_TP_LISTED + 1)
            if not isinstance(_input_shard(cfg, in_features, t, 0), str)]


def _largest_divisor(n: int, at_most: int, step: int = 1) -> int:
    return max(g for g in range(step, min(n, at_most) + 1, step) if n % g == 0)


def requantize_hint(cfg: LayerConfig, in_features: int, tp_size: int) -> str:
    """`fasq quantize` options whose codebooks and scale groups fit shards of in / tp columns."""
    part = in_features // tp_size
    if in_features % tp_size or part % cfg.d:
        return f"in_features / {tp_size} must be a whole number of d={cfg.d} sub-vectors"
    if cfg.method == "rtn":
        return f"--group-size {_largest_divisor(part, cfg.scale_group_size(in_features))}"
    hint = f"--codebook-group {_largest_divisor(part // cfg.d, _span(cfg, in_features))}"
    if PQLinear.scale_kinds(cfg)[0]:
        hint += f" --scale-group {_largest_divisor(part, cfg.scale_group_size(in_features), cfg.d)}"
    return hint


def input_shard(cfg: LayerConfig, in_features: int, tp_size: int, rank: int, name: str) -> InputShard:
    """This rank's share of the input columns of layer `name`, or a ShardingError that
    names the layer, the reason and the sizes that would work."""
    shard = _input_shard(cfg, in_features, tp_size, rank)
    if isinstance(shard, str):
        raise ShardingError(
            f"fasq layer {name} (in_features={in_features}, {cfg.method} d={cfg.d}) cannot be split "
            f"across its input at tensor parallel size {tp_size}: {shard}, so a codebook or scale "
            f"group would straddle a shard boundary. Tensor parallel sizes that work for this "
            f"layer: {working_tp_sizes(cfg, in_features)}; or re-quantize with codebook and scale "
            f"groups that divide the shard, e.g. `fasq quantize ... "
            f"{requantize_hint(cfg, in_features, tp_size)}`")
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
