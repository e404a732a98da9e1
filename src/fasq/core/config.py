"""Quantization configs, validated on construction.

Two methods share one storage format (see `format.py`):
- `PQConfig`: FASQ product quantization, k-means codebooks learned from the weights;
- `RTNConfig`: round-to-nearest, asymmetric, per-group scale and minimum, written as a
  d=1 "product quantizer" whose codebook is the integer grid 0..2^bits-1.

`QuantConfig` is what a checkpoint's `quantization_config` holds: one method config
for every quantized linear layer, plus optional per-layer overrides (the target-size
solver picks (d, K, scope) per layer) and the modules left unquantized.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .transforms import TRANSFORMS

FORMAT_VERSION = 1
QUANT_METHOD = "fasq"  # the name transformers knows our checkpoints by

SCOPES = ("matrix", "group", "subspace")
SCALES = ("none", "absmax", "rms", "minmax")
INITS = ("kmeans++", "random")
DEFAULT_SKIP = ("embed_tokens", "lm_head")
TOP_LEVEL_FIELDS = {"quant_method", "format_version", "layer", "skip", "overrides", "modules", "importance"}
IMPORTANCE = ("none", "random-tokens", "norm")  # see fasq.quant.importance


class ConfigError(ValueError):
    """A quantization setting is invalid; the message says which and what to use."""


def _check_transform(name) -> None:
    if name not in TRANSFORMS:
        raise ConfigError(f"transform must be one of {sorted(TRANSFORMS)}, got {name!r}")


def _divisor_at_least(n: int, minimum: int, step: int) -> int:
    """The smallest multiple of `step` that divides n and is >= minimum (n if none is).

    Lets one group setting fit layers of every width instead of failing on some."""
    for g in range(minimum + (-minimum) % step, n, step):
        if n % g == 0:
            return g
    return n


def _is_pow2(x: int) -> bool:
    return isinstance(x, int) and x > 0 and (x & (x - 1)) == 0


@dataclass
class PQConfig:
    """FASQ product quantization of one linear weight W[out, in].

    W is cut along `in` into M = in / d sub-vectors per row; each is replaced by the
    index of its nearest centroid in a codebook of K centroids (k-means, weights only).
    """

    d: int = 2  # sub-vector length
    K: int = 256  # centroids per codebook (power of two, 2..65536)
    codebook_scope: str = "group"  # "matrix": one per matrix; "group": one per
    # `codebook_group` (at least) consecutive subspaces; "subspace": one per subspace (classic PQ)
    codebook_group: int = 96  # subspaces per codebook when scope == "group" (see `codebook_span`)
    scale: str = "absmax"  # per-row(-group) normalisation before clustering
    scale_group: int = 96  # input columns per scale, at least (see `scale_group_size`); 0 = per row
    refine_scales: bool = True  # after assignment, least-squares fit of each scale (and offset)
    kmeans_iters: int = 10
    kmeans_init: str = "kmeans++"
    kmeans_sample: int = 32768  # sub-vectors per codebook used for fitting (0 = all)
    seed: int = 0
    transform: str = "none"  # input transform folded into W (see `transforms.py`)
    method: str = field(default="pq", init=False)

    def __post_init__(self):
        if not isinstance(self.d, int) or not 1 <= self.d <= 16:
            raise ConfigError(f"d (sub-vector length) must be an integer in 1..16, got {self.d!r}")
        if not _is_pow2(self.K) or not 2 <= self.K <= 65536:
            raise ConfigError(
                f"K (codebook size) must be a power of two between 2 and 65536, got {self.K!r}; "
                "e.g. 16, 256 or 4096")
        if self.codebook_scope not in SCOPES:
            raise ConfigError(f"codebook_scope must be one of {SCOPES}, got {self.codebook_scope!r}")
        if self.codebook_scope == "group" and (not isinstance(self.codebook_group, int) or self.codebook_group < 1):
            raise ConfigError("codebook_scope='group' needs codebook_group >= 1 "
                              "(the number of consecutive subspaces sharing a codebook)")
        if self.scale not in SCALES:
            raise ConfigError(f"scale must be one of {SCALES}, got {self.scale!r}")
        if not isinstance(self.scale_group, int) or self.scale_group < 0:
            raise ConfigError(f"scale_group must be 0 (one scale per row) or a positive number of "
                              f"columns, got {self.scale_group!r}")
        if self.kmeans_iters < 0:
            raise ConfigError(f"kmeans_iters must be >= 0, got {self.kmeans_iters}")
        if self.kmeans_init not in INITS:
            raise ConfigError(f"kmeans_init must be one of {INITS}, got {self.kmeans_init!r}")
        if self.kmeans_sample < 0:
            raise ConfigError(f"kmeans_sample must be >= 0 (0 = all), got {self.kmeans_sample}")
        _check_transform(self.transform)

    @property
    def code_bits(self) -> int:
        return self.K.bit_length() - 1

    def codebook_span(self, in_features: int) -> int:
        """Subspaces per codebook for a layer of width `in`."""
        M = in_features // self.d
        if self.codebook_scope == "group":
            return _divisor_at_least(M, self.codebook_group, 1)
        return M if self.codebook_scope == "matrix" else 1

    def num_codebooks(self, in_features: int) -> int:
        return (in_features // self.d) // self.codebook_span(in_features)

    def scale_group_size(self, in_features: int) -> int:
        """Columns per scale for a layer: the smallest multiple of d that divides `in` and
        is >= scale_group (so one setting fits every width: 96 for 576 and 1536, 128 for
        4096, 112 for 14336); `in` (one scale per row) for scale_group 0."""
        return _divisor_at_least(in_features, self.scale_group, self.d) if self.scale_group else in_features

    def scale_kinds(self) -> tuple[bool, bool]:
        """(has scales, has offsets)."""
        return self.scale != "none", self.scale == "minmax"

    def num_scale_groups(self, in_features: int) -> int:
        return in_features // self.scale_group_size(in_features)

    def check_shape(self, out_features: int, in_features: int, name: str = "weight") -> None:
        """Raise ConfigError if a [out, in] weight cannot be stored with this config."""
        if in_features % self.d:
            raise ConfigError(
                f"{name}: in_features={in_features} is not divisible by d={self.d}; choose a d that "
                f"divides it or leave the layer unquantized (--skip)")
        M = in_features // self.d
        per_codebook = out_features * M // self.num_codebooks(in_features)
        if self.K > per_codebook:
            raise ConfigError(
                f"{name}: K={self.K} is larger than the {per_codebook} sub-vectors each codebook "
                f"would be fitted on; use a smaller K or a wider codebook scope")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    learns_codebooks = True  # k-means (weighted by input-channel importance when given)

    def label(self) -> str:
        return f"d{self.d}K{self.K}" + ("" if self.codebook_scope == "matrix" else f"/{self.codebook_scope}")

    def knobs(self) -> str:
        return f"d={self.d}, K={self.K}, scope={self.codebook_scope}, scale={self.scale}"


@dataclass
class RTNConfig:
    """Round-to-nearest, asymmetric: w ~ q * scale + minimum, per group of input columns."""

    bits: int = 4
    group_size: int = 64  # input columns per (scale, minimum); 0 = one per output row
    transform: str = "none"  # input transform folded into W (see `transforms.py`)
    method: str = field(default="rtn", init=False)

    @property
    def seed(self) -> int:
        return 0  # RTN is deterministic; a transform's state is made with this seed

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ConfigError(f"RTN bits must be an integer in 1..8, got {self.bits!r}")
        if not isinstance(self.group_size, int) or self.group_size < 0:
            raise ConfigError(f"RTN group_size must be >= 0 (0 = per row), got {self.group_size!r}")
        _check_transform(self.transform)

    @property
    def d(self) -> int:
        return 1

    @property
    def K(self) -> int:
        return 1 << self.bits

    @property
    def code_bits(self) -> int:
        return self.bits

    def num_codebooks(self, in_features: int) -> int:
        return 1

    def scale_group_size(self, in_features: int) -> int:
        return self.group_size or in_features

    def scale_kinds(self) -> tuple[bool, bool]:
        return True, True  # a scale and a minimum per group

    def num_scale_groups(self, in_features: int) -> int:
        return in_features // self.scale_group_size(in_features)

    def check_shape(self, out_features: int, in_features: int, name: str = "weight") -> None:
        if self.group_size and in_features % self.group_size:
            raise ConfigError(f"{name}: in_features={in_features} is not divisible by RTN "
                              f"group_size={self.group_size}; pick a divisor (e.g. 32 or 64 for 576)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    learns_codebooks = False  # a fixed grid of 2**bits levels

    def label(self) -> str:
        return f"rtn{self.bits}g{self.group_size}"

    def knobs(self) -> str:
        return f"bits={self.bits}, group_size={self.group_size}"


LayerConfig = PQConfig | RTNConfig


def layer_config_from_dict(d: dict[str, Any]) -> LayerConfig:
    d = dict(d)
    method = d.pop("method", "pq")
    cls = {"pq": PQConfig, "rtn": RTNConfig}.get(method)
    if cls is None:
        raise ConfigError(f"unknown quantization method {method!r}; expected 'pq' or 'rtn'")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"unknown {method} settings: {sorted(unknown)}")
    return cls(**d)


@dataclass
class QuantConfig:
    """Everything about a quantized checkpoint except its tensors."""

    layer: LayerConfig = field(default_factory=PQConfig)
    skip: tuple[str, ...] = DEFAULT_SKIP  # module-name patterns left unquantized
    overrides: dict[str, LayerConfig] = field(default_factory=dict)  # per-module configs
    modules: tuple[str, ...] = ()  # the modules that were quantized (filled in by conversion)
    format_version: int = FORMAT_VERSION
    # Input-channel importance that weights k-means, the code choice and the scale fit (PQ
    # layers): "random-tokens" (default), "norm" or "none" (plain weight error); see
    # `fasq.quant.importance`: from the model alone, no text. Informational in a checkpoint: the
    # tensors are read the same way whatever it says. Checkpoints without it: "none".
    importance: str = "random-tokens"

    def __post_init__(self):
        if self.importance not in IMPORTANCE:
            raise ConfigError(f"importance must be one of {IMPORTANCE}, got {self.importance!r}")
        if self.format_version > FORMAT_VERSION:
            raise ConfigError(
                f"checkpoint format version {self.format_version} is newer than this fasq supports "
                f"({FORMAT_VERSION}); upgrade fasq to load it")
        self.skip = tuple(self.skip)
        self.modules = tuple(self.modules)

    def for_module(self, name: str) -> LayerConfig:
        return self.overrides.get(name, self.layer)

    def is_skipped(self, name: str) -> bool:
        return any(name == s or name.endswith("." + s) or s in name.split(".") for s in self.skip)

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "layer": self.layer.to_dict(),
            "skip": list(self.skip),
            "overrides": {k: v.to_dict() for k, v in self.overrides.items()},
            "modules": list(self.modules),
            "importance": self.importance,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        if d.get("quant_method") != QUANT_METHOD:
            raise ConfigError(f"not a fasq quantization_config (quant_method={d.get('quant_method')!r})")
        unknown = set(d) - TOP_LEVEL_FIELDS
        if unknown:
            raise ConfigError(f"unknown quantization_config fields {sorted(unknown)} (this fasq knows "
                              f"{sorted(TOP_LEVEL_FIELDS)}); the config was edited, or written by a newer fasq")
        version = d.get("format_version")
        if not isinstance(version, int):
            raise ConfigError("quantization_config has no integer format_version; the checkpoint is corrupted")
        if version > FORMAT_VERSION:
            raise ConfigError(
                f"checkpoint format version {version} is newer than this fasq supports "
                f"({FORMAT_VERSION}); upgrade fasq to load it")
        return cls(
            layer=layer_config_from_dict(d["layer"]),
            skip=tuple(d.get("skip", DEFAULT_SKIP)),
            overrides={k: layer_config_from_dict(v) for k, v in d.get("overrides", {}).items()},
            modules=tuple(d.get("modules", ())),
            format_version=version,
            importance=d.get("importance", "none"),
        )
