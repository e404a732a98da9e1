"""`PQLinear`: a linear layer stored in the FASQ format.

Built from sizes and a layer config only (so it can live on the meta device while a
checkpoint loads); `forward` is one call of the `fasq::pq_linear` op.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import ops
from .config import LayerConfig


class PQLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, config: LayerConfig, bias: bool = False,
                 device=None, dtype: torch.dtype = torch.float16):
        super().__init__()
        config.check_shape(out_features, in_features)
        self.in_features, self.out_features, self.config = in_features, out_features, config
        M, C = in_features // config.d, config.num_codebooks(in_features)
        S = self.num_scale_groups(config, in_features)
        # codes: [out, M]; codebooks: [C, K, d]; scales, offsets: [out, S]
        self.register_buffer("codes", torch.empty(out_features, M, dtype=ops.code_dtype(config.K), device=device))
        self.register_buffer("codebooks", torch.empty(C, config.K, config.d, dtype=dtype, device=device))
        has_scales, has_offsets = self.scale_kinds(config)
        self.register_buffer("scales", torch.empty(out_features, S, dtype=dtype, device=device) if has_scales else None)
        self.register_buffer("offsets", torch.empty(out_features, S, dtype=dtype, device=device) if has_offsets else None)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    @staticmethod
    def scale_kinds(config: LayerConfig) -> tuple[bool, bool]:
        """(has scales, has offsets) for a config."""
        if config.method == "rtn":
            return True, True
        return config.scale != "none", config.scale == "minmax"

    @staticmethod
    def num_scale_groups(config: LayerConfig, in_features: int) -> int:
        group = config.group_size if config.method == "rtn" else config.scale_group
        return in_features // group if group else 1

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.fasq.pq_linear(x, self.codes, self.codebooks, self.scales, self.offsets, self.bias)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """W[out, in] as a dense tensor."""
        return ops.dequantize(self.codes, self.codebooks, self.scales, self.offsets, dtype=dtype)

    def extra_repr(self) -> str:
        c = self.config
        knobs = f"bits={c.bits}, group_size={c.group_size}" if c.method == "rtn" else (
            f"d={c.d}, K={c.K}, scope={c.codebook_scope}, scale={c.scale}")
        return f"in_features={self.in_features}, out_features={self.out_features}, {c.method}: {knobs}"
