"""Checkpoint files: write a quantized checkpoint's files and load one.

A checkpoint folder holds `config.json` (with the versioned `quantization_config`),
`model.safetensors` or shards with their index (tensors only), the tokenizer,
`fasq_report.json` (per-layer errors and sizes, informational) and `fasq_manifest.json`
(byte counts and sha256 of the tensor files, and the quantization_config; checked on load:
see `manifest.py`). Both quantization paths write through `write_tensors` and
`write_checkpoint_files`, into a temporary folder renamed into place at the end, so a
failed or interrupted run never leaves a checkpoint that loads.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..core.format import STORE_DTYPE
from .manifest import INDEX_NAME, REPORT_NAME, WEIGHTS_NAME, CheckpointError, file_record, verified, write_manifest
from .outdir import atomic_output_dir

__all__ = ["CheckpointError", "load_quantized", "save_quantized", "state_for_saving", "write_checkpoint_files",
           "write_tensors"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja")


def state_for_saving(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors to save: packed codes, floats in `dtype`, tied tensors once."""
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


def write_tensors(tensors: dict[str, torch.Tensor], path: Path) -> dict:
    """One safetensors file, written under a temporary name and renamed; its manifest record."""
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
    return file_record(path)


def write_checkpoint_files(folder: Path, config, qcfg: dict, files: dict[str, dict], report: dict | None,
                           generation_config=None, tokenizer=None, tokenizer_folder: str | None = None,
                           dtype: torch.dtype = STORE_DTYPE, index: dict | None = None) -> None:
    """Everything beside the tensor files (`files`: their manifest records): the shard index
    (`index`: its contents, for a sharded checkpoint), config.json (a `PretrainedConfig`, or
    a raw dict for an architecture transformers does not know) with `qcfg` in it, the
    generation config, the tokenizer (or, without one, its files copied from
    `tokenizer_folder`), the report and the manifest."""
    files = dict(files)
    if index is not None:
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
        files[INDEX_NAME] = file_record(folder / INDEX_NAME)
    _write_config(folder, config, qcfg, dtype, generation_config)
    _write_tokenizer(folder, tokenizer, tokenizer_folder)
    if report is not None:
        (folder / REPORT_NAME).write_text(json.dumps(report, indent=1))
    write_manifest(folder, files, qcfg)


def _write_config(folder: Path, config, qcfg: dict, dtype: torch.dtype, generation_config) -> None:
    if isinstance(config, dict):  # an architecture this transformers does not know
        config = {**config, "quantization_config": qcfg, "dtype": str(dtype).removeprefix("torch.")}
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return
    config.quantization_config = qcfg
    config.dtype = dtype
    if not getattr(config, "architectures", None):  # unset for GGUF sources; serving engines read it
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
        config.architectures = [name] if name else None
    config.save_pretrained(folder)
    if generation_config is not None:
        generation_config.save_pretrained(folder)


def _write_tokenizer(folder: Path, tokenizer, tokenizer_folder: str | None) -> None:
    """The tokenizer as transformers saves it; one it cannot save, or none, its files."""
    if tokenizer is not None:
        try:
            tokenizer.save_pretrained(folder)
            return
        except (OSError, ValueError, KeyError):
            pass
    for f in TOKENIZER_FILES:
        if tokenizer_folder and (Path(tokenizer_folder) / f).is_file():
            shutil.copy2(Path(tokenizer_folder) / f, folder / f)


def save_quantized(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, report: dict | None = None,
                   overwrite: bool = False, dtype: torch.dtype = STORE_DTYPE, inputs=()) -> Path:
    """Write a quantized model's checkpoint atomically: temporary sibling folder, then rename.
    `inputs`: local paths the model was read from (an output on top of them is refused)."""
    with atomic_output_dir(out_dir, overwrite, inputs) as tmp:
        files = {WEIGHTS_NAME: write_tensors(state_for_saving(model, dtype), tmp / WEIGHTS_NAME)}
        if not getattr(model.config, "architectures", None):  # unset for GGUF sources; vLLM reads it
            model.config.architectures = [type(model).__name__]
        qc = model.config.quantization_config
        write_checkpoint_files(tmp, model.config, qc.to_dict() if hasattr(qc, "to_dict") else qc, files, report,
                               getattr(model, "generation_config", None), tokenizer, dtype=dtype)
    return Path(out_dir)


def load_quantized(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load a fasq checkpoint as a transformers model (through the quantizer `import fasq`
    registers)."""
    from transformers import AutoModelForCausalLM

    with verified(path):  # every file hashed once: the quantizer's own check reuses this one
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, device_map=device)
    return model.eval()
