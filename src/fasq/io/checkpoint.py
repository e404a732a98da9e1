"""Model integration: convert a model's linear layers, save and load checkpoints.

A checkpoint folder holds `config.json` (with the versioned `quantization_config`),
`model.safetensors` (tensors only), the tokenizer, `fasq_report.json` (per-layer errors
and sizes, informational) and `fasq_manifest.json` (byte counts and sha256 of the
tensor file, and the quantization_config; checked on load: see `manifest.py`). Writes go
to a temporary folder renamed into place at the end, so a failed or interrupted run never
leaves a checkpoint that loads.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..core.config import QuantConfig
from ..core.convert import quantizable_linears, replace_linears, set_module  # noqa: F401 - re-exported
from ..core.format import layer_size
from .manifest import (INDEX_NAME, MANIFEST_NAME, REPORT_NAME, WEIGHTS_NAME, CheckpointError,  # noqa: F401
                       file_record, is_checkpoint, verify_checkpoint, write_manifest)
from ..core.module import PQLinear, size_table
from .outdir import atomic_output_dir, check_output_dir  # noqa: F401 - re-exported
from ..quant.quantize import error_report, quantize_transformed


def layer_importance(model: nn.Module, qcfg: QuantConfig, names: list[str]) -> dict[str, torch.Tensor]:
    """Column weights per named layer for `qcfg.importance` ({} for "none")."""
    if qcfg.importance == "none" or not any(qcfg.for_module(n).method == "pq" for n in names):
        return {}
    from ..quant.importance import estimate

    try:
        return estimate(model, qcfg.importance, names)
    except (AttributeError, TypeError, ValueError, RuntimeError, NotImplementedError) as e:
        if qcfg.importance != "random-tokens":
            raise
        warnings.warn(f"the random-token importance estimate could not run this model ({type(e).__name__}: "
                      f"{e}); using the norm-weight estimate (importance='norm')", stacklevel=3)
        qcfg.importance = "norm"
        return estimate(model, "norm", names)


@torch.no_grad()
def quantize_model(model: nn.Module, qcfg: QuantConfig, device=None, progress: bool = True) -> dict:
    """Quantize every non-skipped linear layer in place; returns the report.

    `device` is where k-means runs (default: each weight's device). Fails before
    changing anything if a layer's shape does not fit its config.
    """
    layers = quantizable_linears(model, qcfg)
    if not layers:
        raise ValueError("the model has no linear layers to quantize (all skipped?)")
    for name, lin in layers:  # validate every layer first: all or nothing
        qcfg.for_module(name).check_shape(lin.out_features, lin.in_features, name)
    report, t0 = [], time.perf_counter()
    imp = layer_importance(model, qcfg, [n for n, _ in layers])  # before any layer changes
    t_imp = time.perf_counter() - t0
    for name, lin in tqdm(layers, desc="quantizing", unit="layer", disable=not progress):
        cfg = qcfg.for_module(name)
        W = lin.weight.detach()
        # W_hat: the effective weight of the stored (fp16) tensors, as pq.effective_weight gives it
        tensors, W_hat = quantize_transformed(W, cfg, name=name, device=device, importance=imp.get(name))
        pq = PQLinear(lin.in_features, lin.out_features, cfg, bias=lin.bias is not None,
                      device=W.device, dtype=torch.float16)
        for key, t in tensors.items():
            if t is not None:
                getattr(pq, key).copy_(t)
        if lin.bias is not None:
            pq.bias.copy_(lin.bias)
        err = error_report(W, W_hat.to(W.device))
        report.append({"name": name, "out": lin.out_features, "in": lin.in_features,
                       "bits_per_weight": layer_size(pq).bits_per_weight, **err})
        set_module(model, name, pq)
    qcfg.modules = tuple(n for n, _ in layers)
    model.config.quantization_config = qcfg.to_dict()
    return {"seconds": time.perf_counter() - t0, "importance_seconds": t_imp, "layers": report,
            "size": size_table(model)}


def _state_for_saving(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors to save: packed codes, fp16 floats, tied tensors once."""
    tensors, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.dtype) if t.device.type != "meta" else name
        if key in seen:  # tied weights (e.g. lm_head = embed_tokens) are stored once
            continue
        seen.add(key)
        if t.is_floating_point():
            t = t.to(dtype)
        tensors[name] = t.detach().to("cpu").contiguous()
    return tensors


def save_quantized(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, report: dict | None = None,
                   overwrite: bool = False, dtype: torch.dtype = torch.float16, inputs=()) -> Path:
    """Write a checkpoint atomically: temporary sibling folder, then rename. `inputs`: local
    paths the model was read from (an output on top of them is refused)."""
    with atomic_output_dir(out_dir, overwrite, inputs) as tmp:
        save_file(_state_for_saving(model, dtype), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        model.config.dtype = dtype
        if not getattr(model.config, "architectures", None):  # unset for GGUF sources; vLLM reads it
            model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            (tmp / REPORT_NAME).write_text(json.dumps(report, indent=1))
        qc = model.config.quantization_config
        write_manifest(tmp, {WEIGHTS_NAME: file_record(tmp / WEIGHTS_NAME)},
                       qc.to_dict() if hasattr(qc, "to_dict") else qc)
    return Path(out_dir)


def load_quantized(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load a fasq checkpoint as a transformers model (through the registered quantizer)."""
    from transformers import AutoModelForCausalLM  # fasq's quantizer is registered by `import fasq`

    verify_checkpoint(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, device_map=device)
    return model.eval()
