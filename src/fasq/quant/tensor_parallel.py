"""Which tensor-parallel splits a layer config allows, and configs that allow a given one.

Row parallelism (vLLM's o_proj, down_proj) splits a layer's input columns across ranks:
each rank takes a run of subspaces, the codebooks serving them and the scale groups
covering them. That works when a shard is a whole number of codebooks and scale groups,
or lies inside one (then replicated). Column parallelism splits rows and always works.
`fit_config` picks the largest codebook and scale groups no larger than the requested ones
(so no fewer codebooks and scales: quality no worse) that split evenly at N ranks in every
layer of a model (`fasq quantize --tensor-parallel N`).
Pure arithmetic on configs: no tensors, no vLLM.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..core.config import ConfigError, LayerConfig

MAX_TP_LISTED = 16  # the tensor-parallel sizes an error message considers


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


def span(cfg: LayerConfig, in_features: int) -> int:
    """Subspaces per codebook."""
    return (in_features // cfg.d) // cfg.num_codebooks(in_features)


def _split(unit: int, part: int, start: int, what: str, units: str) -> tuple[int, int] | str:
    """(first block, blocks) of `unit`-sized blocks covering [start, start + part), when the
    shard is whole blocks or lies inside one (replicated); else the reason it cannot."""
    if part % unit == 0:
        return start // unit, part // unit
    if unit % part == 0:
        return start // unit, 1
    return f"a {what} covers {unit} {units} and a shard {part}"


def input_shard_or_reason(cfg: LayerConfig, in_features: int, tp_size: int, rank: int) -> InputShard | str:
    if in_features % tp_size:
        return f"in_features={in_features} is not divisible by {tp_size}"
    part, col0 = in_features // tp_size, rank * (in_features // tp_size)
    if part % cfg.d:
        return f"a shard of {part} columns is not a whole number of d={cfg.d} sub-vectors"
    M_part, m0 = part // cfg.d, col0 // cfg.d
    cb = _split(span(cfg, in_features), M_part, m0, "codebook", "subspaces")
    if isinstance(cb, str):
        return cb
    sg = (0, 0)
    if cfg.scale_kinds()[0]:
        sg = _split(cfg.scale_group_size(in_features), part, col0, "scale group", "columns")
        if isinstance(sg, str):
            return sg
    return InputShard(cfg.d, in_features // cfg.d, m0, M_part, cb[0], cb[1], sg[0], sg[1])


def splits(cfg: LayerConfig, in_features: int, tp_size: int) -> bool:
    return not isinstance(input_shard_or_reason(cfg, in_features, tp_size, 0), str)


def working_tp_sizes(cfg: LayerConfig, in_features: int) -> list[int]:
    """The row-parallel sizes (up to MAX_TP_LISTED) at which this layer can be split."""
    return [t for t in range(1, MAX_TP_LISTED + 1) if splits(cfg, in_features, t)]


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _closest(candidates, target: int, fits):
    """The largest candidate <= `target` for which `fits` holds (groups no coarser than asked:
    as many codebooks and scales or more, so quality no worse), else the smallest above it."""
    for c in sorted(candidates, key=lambda c: (c > target, -c if c <= target else c)):
        if fits(c):
            return c
    return None


def fit_config(cfg: LayerConfig, shapes, tp_size: int) -> LayerConfig:
    """`cfg` with codebook and scale groups that split evenly at `tp_size` ranks in every layer
    of `shapes` ([(out or None, in)]), the largest no larger than the requested ones; `cfg` itself
    when it already does. Raises ConfigError when no group setting can (widths not divisible)."""
    shapes = sorted(set(shapes), key=lambda s: s[1])
    widths = [i for _, i in shapes]
    for w in widths:
        if w % tp_size or (w // tp_size) % cfg.d:
            raise ConfigError(f"a layer {w} columns wide cannot be split into {tp_size} shards of whole "
                              f"d={cfg.d} sub-vectors; choose another --tensor-parallel or d")

    def fits(c, out, w) -> bool:
        try:
            c.check_shape(out or 1 << 30, w)
            return True
        except ConfigError:
            return False

    stored = [(out, w) for out, w in shapes if fits(cfg, out, w)]  # layers it can store (others are skipped)

    def valid(c) -> bool:
        return all(fits(c, out, w) for out, w in stored) and all(splits(c, w, tp_size) for w in widths)

    if valid(cfg):
        return cfg
    if not cfg.learns_codebooks:  # RTN: one group size
        sizes = [g for g in range(1, widths[0] + 1) if all(w % g == 0 for w in widths)]
        g = _closest(sizes, cfg.group_size or widths[-1], lambda g: valid(dataclasses.replace(cfg, group_size=g)))
        return dataclasses.replace(cfg, group_size=g)
    fitted = cfg
    # candidates: group sizes some layer uses exactly (a divisor of its subspaces / columns)
    if cfg.codebook_scope == "group":  # codebooks: checked with scales out of the way
        sizes = {g for w in widths for g in _divisors(w // cfg.d)}
        g = _closest(sizes, cfg.codebook_group,
                     lambda g: valid(dataclasses.replace(cfg, codebook_group=g, scale="none")))
        fitted = dataclasses.replace(fitted, codebook_group=g)
    if cfg.scale_kinds()[0] and cfg.scale_group:
        sizes = {s for w in widths for s in _divisors(w) if s % cfg.d == 0}
        s = _closest(sizes, cfg.scale_group,
                     lambda s: valid(dataclasses.replace(cfg, scale_group=s, codebook_scope="matrix")))
        fitted = dataclasses.replace(fitted, scale_group=s)
    if not valid(fitted):  # pragma: no cover - each part fits on its own, so both do
        raise ConfigError(f"no codebook and scale groups of {cfg} split every layer at tensor parallel {tp_size}")
    return fitted


def group_options(cfg: LayerConfig) -> str:
    """The `fasq quantize` options that set a config's groups."""
    if not cfg.learns_codebooks:  # RTN: one group size
        return f"--group-size {cfg.group_size}"
    opts = f"--codebook-group {cfg.codebook_group}" if cfg.codebook_scope == "group" else ""
    if cfg.scale_kinds()[0]:
        opts += f" --scale-group {cfg.scale_group}"
    return opts.strip()
