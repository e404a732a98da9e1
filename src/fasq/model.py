"""Model integration: convert a model's linear layers, save and load checkpoints.

A checkpoint folder holds `config.json` (with the versioned `quantization_config`),
`model.safetensors` (tensors only), the tokenizer, `fasq_report.json` (per-layer errors
and sizes, informational) and `fasq_manifest.json` (byte counts and sha256 of the
tensor file, checked on load). Writes go to a temporary folder renamed into place at
the end, so a failed or interrupted run never leaves a checkpoint that loads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .config import FORMAT_VERSION, QuantConfig
from .format import layer_size, size_table
from .module import PQLinear
from .quantize import error_report, quantize_weight

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"  # sharded checkpoints (written by fasq.stream)
MANIFEST_NAME = "fasq_manifest.json"
REPORT_NAME = "fasq_report.json"


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, incomplete, corrupted or of an unknown version."""


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


def layer_importance(model: nn.Module, qcfg: QuantConfig, names: list[str]) -> dict[str, torch.Tensor]:
    """Column weights per named layer for `qcfg.importance` ({} for "none")."""
    if qcfg.importance == "none" or not any(qcfg.for_module(n).method == "pq" for n in names):
        return {}
    from .importance import estimate

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
        tensors = quantize_weight(W, cfg, name=name, device=device, importance=imp.get(name))
        pq = PQLinear(lin.in_features, lin.out_features, cfg, bias=lin.bias is not None,
                      device=W.device, dtype=torch.float16)
        for key, t in tensors.items():
            if t is not None:
                getattr(pq, key).copy_(t)
        if lin.bias is not None:
            pq.bias.copy_(lin.bias)
        err = error_report(W, pq.dequantize(torch.float32))
        report.append({"name": name, "out": lin.out_features, "in": lin.in_features,
                       "bits_per_weight": layer_size(pq).bits_per_weight, **err})
        set_module(model, name, pq)
    qcfg.modules = tuple(n for n, _ in layers)
    model.config.quantization_config = qcfg.to_dict()
    return {"seconds": time.perf_counter() - t0, "importance_seconds": t_imp, "layers": report,
            "size": size_table(model)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


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


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True for a folder whose config.json declares a fasq quantization_config."""
    f = Path(path) / "config.json"
    try:
        qdict = json.loads(f.read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(qdict, dict) and qdict.get("quant_method") == "fasq"


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an output path that is a file, or a folder with files unless `overwrite`."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; choose another --out")
    if out.exists() and any(out.iterdir()) and not overwrite:
        what = "a checkpoint" if is_checkpoint(out) else "files"
        raise FileExistsError(f"{out} already holds {what}; pass --overwrite to replace it, "
                              "or choose another --out")
    return out


def save_quantized(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, report: dict | None = None,
                   overwrite: bool = False, dtype: torch.dtype = torch.float16) -> Path:
    """Write a checkpoint atomically: temporary sibling folder, then rename."""
    with atomic_output_dir(out_dir, overwrite) as tmp:
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
        w = tmp / WEIGHTS_NAME
        manifest = {"format_version": FORMAT_VERSION,
                    "files": {WEIGHTS_NAME: {"bytes": w.stat().st_size, "sha256": _sha256(w)}}}
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    return Path(out_dir)


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool):
    """Yield a temporary sibling folder to fill; on success it replaces `out_dir`, on any
    error it is removed and `out_dir` is left as it was."""
    out = check_output_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(new: Path, out: Path) -> None:
    """Move `new` to `out`; an existing `out` is kept until the new one is in place."""
    if not out.exists():
        os.replace(new, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check the manifest (sizes, sha256) and config; return the quantization_config dict."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{p} has no config.json: not a model folder")
    try:
        cfg = json.loads((p / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p / 'config.json'} is not valid JSON ({e}); the checkpoint is corrupted") from e
    qdict = cfg.get("quantization_config")
    if not qdict or qdict.get("quant_method") != "fasq":
        raise CheckpointError(f"{p} is not a fasq checkpoint (no fasq quantization_config)")
    QuantConfig.from_dict(qdict)  # raises on unknown/newer format versions
    mpath = p / MANIFEST_NAME
    if not mpath.is_file():  # e.g. written by transformers' save_pretrained: nothing to check against
        return qdict
    manifest = json.loads(mpath.read_text())
    for fname, meta in manifest["files"].items():
        f = p / fname
        if not f.is_file():
            raise CheckpointError(f"{f} is missing: the checkpoint is incomplete")
        if f.stat().st_size != meta["bytes"]:
            raise CheckpointError(f"{f} has {f.stat().st_size} bytes, expected {meta['bytes']}: "
                                  "the checkpoint is truncated; re-run `fasq quantize`")
        if _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{f} does not match its sha256 checksum: the checkpoint is "
                                  "corrupted; re-run `fasq quantize`")
    return qdict


def load_quantized(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load a fasq checkpoint as a transformers model (through the registered quantizer)."""
    from transformers import AutoModelForCausalLM

    from . import hf  # noqa: F401 - registers the quantizer

    verify_checkpoint(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, device_map=device)
    return model.eval()
