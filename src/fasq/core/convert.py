"""Model conversion: find a model's linear layers and swap them for `PQLinear` ones."""

from __future__ import annotations

import torch
from torch import nn

from .config import QuantConfig
from .module import PQLinear


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantizable_linears(model: nn.Module, qcfg: QuantConfig) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and not qcfg.is_skipped(n)]


def replace_linears(model: nn.Module, qcfg: QuantConfig, names, device=None, dtype=torch.float16,
                    packed_codes: bool = False) -> None:
    """Swap the named nn.Linear modules for empty PQLinear ones (meta device works)."""
    for name in names:
        lin = model.get_submodule(name)
        pq = PQLinear(lin.in_features, lin.out_features, qcfg.for_module(name), bias=lin.bias is not None,
                      device=device if device is not None else lin.weight.device, dtype=dtype)
        if packed_codes:
            pq.expect_packed_codes()
        set_module(model, name, pq)
