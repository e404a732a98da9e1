"""The in-memory API: a built model's linear layers quantized in place, through the same
plan, layer selection, importance step and per-layer quantize-and-report function as the
streaming pipeline (`pipeline.py`); the model is read through `ModuleReader`.

    report = quantize_model(model, QuantConfig())
    save_quantized(model, "out_dir", tokenizer, report)   # fasq.io.checkpoint
"""

from __future__ import annotations

import time
import warnings

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.config import QuantConfig
from ..core.convert import linear_names, set_module
from ..core.module import PQLinear, size_table
from ..io.manifest import WEIGHTS_NAME
from .pipeline import make_plan, quantize_layer, set_importance
from .readers import TensorInfo


class ModuleReader:
    """A built model as a tensor source: its state dict, one group, read as it is (no copy,
    no cast), and its nn.Linear modules as the layers to quantize."""

    def __init__(self, model: nn.Module, tokenizer=None):
        self.model, self.tokenizer = model, tokenizer
        self._state = {n: t.detach() for n, t in model.state_dict().items()}
        self.groups = [(WEIGHTS_NAME, list(self._state))]

    def linear_names(self) -> list[str]:
        return linear_names(self.model)

    def info(self, name: str) -> TensorInfo:
        t = self._state[name]
        return TensorInfo(tuple(t.shape), t.dtype, t.numel() * t.element_size())

    def read(self, name: str) -> torch.Tensor:
        return self._state[name]

    def close(self) -> None:
        pass

    def load_config(self):
        return self.model.config

    def load_tokenizer(self):
        return self.tokenizer


def _warn(msg: str) -> None:
    warnings.warn(msg, stacklevel=4)


@torch.no_grad()
def quantize_model(model: nn.Module, qcfg: QuantConfig, device=None, progress: bool = True) -> dict:
    """Quantize every non-skipped linear layer in place; returns the report.

    `device` is where k-means runs (default: each weight's device). Fails before
    changing anything if a layer's shape does not fit its config. Sets `qcfg.modules` (and
    `qcfg.importance`, if the estimate fell back to "norm") and the model's
    `quantization_config`.
    """
    plan = make_plan(None, qcfg, reader=ModuleReader(model), dtype=None)  # every layer checked first
    t0 = time.perf_counter()
    set_importance(plan, lambda: model, _warn)  # before any layer changes
    t_imp = time.perf_counter() - t0
    rows = []
    for name in tqdm(plan.modules, desc="quantizing", unit="layer", disable=not progress):
        lin = model.get_submodule(name)
        q, row = quantize_layer(plan, name, lin.weight.detach(), device)
        set_module(model, name, _pq_linear(lin, plan.qcfg.for_module(name), q))
        rows.append(row)
    qcfg.modules, qcfg.importance = tuple(plan.modules), plan.qcfg.importance
    if plan.unties_head:  # lm_head is a PQLinear now; the embeddings stay as they were
        model.config.tie_word_embeddings = False
    model.config.quantization_config = qcfg.to_dict()
    return {"seconds": time.perf_counter() - t0, "importance_seconds": t_imp, "layers": rows,
            "size": size_table(model)}


def _pq_linear(lin: nn.Linear, cfg, q: dict[str, torch.Tensor | None]) -> PQLinear:
    """The PQLinear holding one layer's quantized tensors (floats as fp16, as stored)."""
    pq = PQLinear(lin.in_features, lin.out_features, cfg, bias=lin.bias is not None,
                  device=lin.weight.device, dtype=torch.float16)
    for key, t in q.items():
        if t is not None:
            getattr(pq, key).copy_(t)
    if lin.bias is not None:
        pq.bias.copy_(lin.bias)
    return pq
