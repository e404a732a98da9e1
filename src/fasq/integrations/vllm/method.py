"""The vLLM quantization config and linear method for fasq checkpoints (imports vLLM).

vLLM builds its own layers (column-, row-parallel, merged QKV and gate/up) and asks the
config for a method per layer. `FasqLinearMethod.create_weights` declares this rank's
codes, codebooks, scales and offsets; their weight loaders receive the whole checkpoint
tensor of one sub-matrix (q, k, v, gate, up or a plain layer), unpack and slice it for the
rank (see `sharding.py`). After loading, each sub-matrix gets its own tensors, since
q, k and v (gate and up) have their own codebooks; `apply` calls `fasq::pq_linear` on each,
so GPUs run the fasq kernels and CPUs the fasq CPU kernel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.linear import (LinearBase, LinearMethodBase, QKVParallelLinear,
                                               UnquantizedLinearMethod)
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.utils import set_weight_attrs

from ... import kernels  # noqa: F401 - and its CPU / CUDA implementations
from ...core import ops  # registers fasq::pq_linear and fasq::pq_linear_parts
from ...core.config import QUANT_METHOD, ConfigError, LayerConfig, QuantConfig
from ...core.module import PQLinear, transformed_pq_linear
from ...core.transforms import Identity, get_transform
from ...io.manifest import verify_checkpoint
from . import sharding

QKV_SHARDS = {"q": 0, "k": 1, "v": 2}


class FasqVllmConfig(QuantizationConfig):
    """A checkpoint's `quantization_config` (QuantConfig.to_dict()) as vLLM sees it."""

    def __init__(self, qcfg: QuantConfig):
        super().__init__()
        self.qcfg = qcfg
        self.widths: tuple[int, ...] = ()  # the model's linear input widths, for sharding advice

    def __repr__(self) -> str:
        return f"FasqVllmConfig({self.qcfg.layer}, {len(self.qcfg.modules)} modules)"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # the op has a reference path on every device

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # the config lives in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "FasqVllmConfig":
        return cls(QuantConfig.from_dict(config))

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None) -> None:
        # called once, in vLLM's front-end process: check a local checkpoint's manifest
        # (sizes, sha256) before any worker starts, as `fasq.load_quantized` does
        if Path(model_name).is_dir():
            verify_checkpoint(model_name)
        self.widths = model_widths(hf_config)

    def is_quantized(self, name: str) -> bool:
        if self.qcfg.modules:
            return name in self.qcfg.modules
        return not self.qcfg.is_skipped(name)  # configs written before `modules` existed

    def checkpoint_names(self, prefix: str) -> list[str]:
        """The checkpoint modules vLLM's layer `prefix` holds (q_proj, k_proj, v_proj for qkv_proj)."""
        parent, _, leaf = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(leaf)
        if not parts:
            return [prefix]
        return [f"{parent}.{p}" if parent else p for p in parts]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if not isinstance(layer, LinearBase):
            if prefix.rpartition(".")[2] == "lm_head" and self.is_quantized("lm_head"):
                raise ConfigError("this checkpoint quantizes lm_head (fasq quantize --lm-head rtn8/same), which "
                                  "the vLLM plugin does not serve yet; serve it with transformers, or "
                                  "re-quantize with the head dense (--lm-head dense, the default)")
            return None  # embeddings, lm_head, attention: unquantized (None = vLLM's default)
        names = self.checkpoint_names(prefix)
        quantized = [self.is_quantized(n) for n in names]
        if not any(quantized):
            return UnquantizedLinearMethod()
        if not all(quantized):
            raise ConfigError(f"vLLM merges {names} into one layer {prefix}, but the checkpoint "
                              f"quantized only some of them; quantize all or none (--skip)")
        cfgs = [self.qcfg.for_module(n) for n in names]
        if any(c != cfgs[0] for c in cfgs):
            raise ConfigError(
                f"vLLM merges {names} into one layer {prefix}, but the checkpoint quantized them "
                f"with different configs ({', '.join(str(c.to_dict()) for c in cfgs)}); the vLLM "
                f"plugin needs one config per merged layer: re-quantize without per-layer "
                f"overrides for these modules, or serve the checkpoint with transformers")
        return FasqLinearMethod(cfgs[0], names, prefix, self.widths)


def model_widths(hf_config) -> tuple[int, ...]:
    """Input widths of a decoder's linear layers from its config (hidden size, MLP size,
    attention output), so that sharding advice fits every layer; () when unknown."""
    if hf_config is None:
        return ()
    cfg = getattr(hf_config, "get_text_config", lambda: hf_config)()
    hidden, heads = getattr(cfg, "hidden_size", None), getattr(cfg, "num_attention_heads", None)
    head_dim = getattr(cfg, "head_dim", None) or (hidden // heads if hidden and heads else None)
    widths = (hidden, getattr(cfg, "intermediate_size", None), heads * head_dim if heads and head_dim else None)
    return tuple(sorted({w for w in widths if isinstance(w, int) and w > 0}))


class FasqLinearMethod(LinearMethodBase):
    """One vLLM linear layer stored in the fasq format: `names` are the checkpoint modules it
    holds (one, or q/k/v, gate/up for merged layers), all quantized with `cfg`."""

    def __init__(self, cfg: LayerConfig, names: list[str], prefix: str, widths=()):
        self.cfg, self.names, self.prefix, self.widths = cfg, names, prefix, tuple(widths)

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs):
        cfg = self.cfg
        if len(output_partition_sizes) != len(self.names):
            raise ConfigError(f"vLLM layer {self.prefix} has {len(output_partition_sizes)} sub-matrices "
                              f"but the fasq config maps it to {self.names}")
        if input_size % cfg.d:
            raise ConfigError(f"{self.prefix}: in_features={input_size} is not divisible by d={cfg.d}")
        tp_in = input_size // input_size_per_partition  # > 1 only for row-parallel layers
        cols = sharding.input_shard(cfg, input_size, tp_in, layer.tp_rank if tp_in > 1 else 0, self.prefix,
                                    self.widths)
        rows = _row_ranges(layer, output_partition_sizes, output_size)
        layer.fasq_cols, layer.fasq_out_sizes = cols, list(output_partition_sizes)
        out, parts = sum(output_partition_sizes), len(self.names)
        has_scales, has_offsets = PQLinear.scale_kinds(cfg)
        # codes [out, M] unpacked; codebooks [parts * C, K, d] (each sub-matrix's own, one
        # after the other, like AQLM's is_metadata); scales / offsets [out, S]
        specs = {"codes": ((out, cols.M), ops.code_dtype(cfg.K), {"output_dim": 0, "input_dim": 1}),
                 "codebooks": ((parts * cols.C, cfg.K, cfg.d), params_dtype, {"input_dim": 0, "is_metadata": True})}
        for kind, present in (("scales", has_scales), ("offsets", has_offsets)):
            if present:
                specs[kind] = ((out, cols.S), params_dtype, {"output_dim": 0, "input_dim": 1})
        # an input transform's tensors, one set per sub-matrix (none for the identity)
        layer.fasq_transform = get_transform(cfg.transform)
        tspecs = layer.fasq_transform.tensor_specs(input_size)
        if tspecs and tp_in > 1:
            raise ConfigError(f"{self.prefix}: the input transform {cfg.transform!r} mixes all input features, "
                              f"so it cannot run on row-parallel shards (tensor parallel {tp_in}); serve at "
                              "tensor parallel 1, or quantize without the transform")
        for key, (shape, tdtype) in tspecs.items():
            specs[f"transform_{key}"] = ((parts, *shape), tdtype, {"is_metadata": True})
        for kind, (shape, dtype, attrs) in specs.items():
            p = Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
            # the loader gets whole checkpoint tensors and slices them itself (codes are
            # bit-packed on disk, codebooks follow the input split): vLLM's own loaders cannot
            set_weight_attrs(p, {**attrs, "fasq_code_bits": cfg.code_bits,
                                 "weight_loader": self._loader(kind, cols, rows, output_partition_sizes)})
            layer.register_parameter(kind, p)

    def _part(self, shard_id) -> int:
        if shard_id is None and len(self.names) == 1:
            return 0
        j = QKV_SHARDS.get(shard_id, shard_id) if isinstance(shard_id, str) else shard_id
        if not isinstance(j, int) or not 0 <= j < len(self.names):
            raise ConfigError(f"{self.prefix}: fasq checkpoints store {self.names} as separate tensors; "
                              f"got a weight for shard {shard_id!r} (fused on disk?), which is not supported")
        return j

    def _loader(self, kind: str, cols, rows: list[tuple[int, int]], sizes: list[int]):
        def load(param: Parameter, loaded: torch.Tensor, shard_id=None) -> None:
            j = self._part(shard_id)
            name = self.names[j]
            if kind == "codebooks":
                t, dst = sharding.shard_codebooks(loaded, cols), param.data[j * cols.C:(j + 1) * cols.C]
            elif kind.startswith("transform_"):  # the whole input: never sharded
                t, dst = loaded, param.data[j]
            else:
                dst0 = sum(sizes[:j])  # the sub-matrix's first row in the merged layer
                dst = param.data[dst0:dst0 + rows[j][1]]
                t = (sharding.shard_codes(loaded, self.cfg, rows[j], cols, name) if kind == "codes"
                     else sharding.shard_scales(loaded, rows[j], cols))
            if t.shape != dst.shape:
                raise sharding.ShardingError(
                    f"{name}.{kind}: the checkpoint tensor {list(loaded.shape)} gives {list(t.shape)} "
                    f"on this rank, but the layer expects {list(dst.shape)}: checkpoint and config disagree")
            dst.copy_(t)
        return load

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        # one (codes, codebooks, scales, offsets) per sub-matrix: contiguous views made once,
        # so the kernels' per-layer preparation (keyed by tensor) is reused call after call
        C, parts, r = layer.fasq_cols.C, [], 0
        for j, n in enumerate(layer.fasq_out_sizes):
            parts.append((_rows(layer, "codes", r, n), layer.codebooks.data[j * C:(j + 1) * C],
                          _rows(layer, "scales", r, n), _rows(layer, "offsets", r, n)))
            r += n
        layer.fasq_parts = parts
        layer.fasq_lists = [list(t) for t in zip(*parts)]  # codes, codebooks, scales, offsets of every part
        keys = layer.fasq_transform.tensor_specs(1)
        layer.fasq_states = [{k: getattr(layer, f"transform_{k}").data[j] for k in keys} for j in range(len(parts))]

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        parts, T, states = layer.fasq_parts, layer.fasq_transform, layer.fasq_states  # x: [tokens, in / tp]
        if len(parts) == 1:
            return transformed_pq_linear(x, T, states[0], *parts[0], bias)
        if T is Identity:  # the parts share x as it is: one call (one kernel call on the CPU's decode path)
            y = ops.pq_linear_parts(x, *layer.fasq_lists)
        else:
            y = torch.cat([transformed_pq_linear(x, T, st, *p, None) for st, p in zip(states, parts)], dim=-1)
        return y if bias is None else y + bias  # [tokens, out]


def _rows(layer, name: str, r: int, n: int) -> torch.Tensor | None:
    """Rows r..r+n of a layer's parameter `name` (None when the config has no such tensor)."""
    p = getattr(layer, name, None)
    return None if p is None else p.data[r:r + n]


def _row_ranges(layer, sizes: list[int], output_size: int) -> list[tuple[int, int]]:
    """(first row in the checkpoint tensor, rows) of each sub-matrix on this rank."""
    if sum(sizes) == output_size:  # rows not split (row-parallel, replicated or tp = 1)
        return [(0, n) for n in sizes]
    ranges = []
    for j, n in enumerate(sizes):
        shard = layer.tp_rank
        if isinstance(layer, QKVParallelLinear) and j > 0:  # k, v heads replicated when tp > kv heads
            shard = layer.tp_rank // layer.num_kv_head_replicas
        ranges.append((shard * n, n))
    return ranges
