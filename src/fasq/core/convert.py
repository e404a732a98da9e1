"""Model conversion: find a model's linear layers and swap them for `PQLinear` ones."""

from __future__ import annotations

import torch
from torch import nn

from .config import LayerConfig, QuantConfig
from .module import PQLinear, size_table


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def linear_names(model: nn.Module) -> list[str]:
    """A built model's candidates for quantization: its nn.Linear modules (the streaming
    pipeline selects from these, or from tensor names for files, and drops skipped ones)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def quantizable_linears(model: nn.Module, qcfg: QuantConfig) -> list[tuple[str, nn.Linear]]:
    return [(n, model.get_submodule(n)) for n in linear_names(model) if not qcfg.is_skipped(n)]


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


def model_bytes(model: nn.Module, layers: list[tuple[str, nn.Linear]], cfgs: list[LayerConfig]) -> dict:
    """`size_table` of `model` as it would be with each named linear stored with its config.

    Swaps in empty meta-device PQLinear modules for the call and restores the originals.
    """
    originals = [(name, model.get_submodule(name)) for name, _ in layers]
    try:
        for (name, lin), cfg in zip(layers, cfgs):
            set_module(model, name, PQLinear(lin.in_features, lin.out_features, cfg,
                                              bias=lin.bias is not None, device="meta"))
        return size_table(model)
    finally:
        for name, lin in originals:
            set_module(model, name, lin)
