"""Shared by the commands: dtypes, device and source checks, the Ctrl-C exception."""

from __future__ import annotations

import math

import torch

from ..io.manifest import is_checkpoint
from ..io.sources import local_paths, resolve

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, DTYPES[name])


def check_device(name: str) -> None:
    """A clear refusal of a device this torch cannot use, before any work."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown --device {name!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return
    if dev.type != "cuda":
        raise ValueError(f"--device {name!r} is not supported: use cpu, cuda or cuda:N")
    if torch.version.cuda is None and torch.version.hip is None:
        raise ValueError(f"--device {name}: this torch ({torch.__version__}) is a CPU build without CUDA; "
                         "install a CUDA build of torch, or use --device cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is visible to torch; use --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible "
                         f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")


def check_source(model: str) -> list:
    """The local paths a quantize/export/baseline reads; refuses a fasq checkpoint as input."""
    if is_checkpoint(resolve(model)[0]):
        raise ValueError(f"{model} is already a fasq checkpoint; quantize the model it was made from "
                         f"(`fasq info {model}` names it)")
    return local_paths(model)


class Interrupted(Exception):
    """Ctrl-C, with what it left behind and how to carry on."""


def report_summary(report: dict) -> dict:
    """The report's one-line JSON summary: sizes, time, mean errors."""
    layers = report["layers"]
    finite = [r["sqnr_db"] for r in layers if math.isfinite(r["sqnr_db"])]
    return {**report["size"], "seconds": report["seconds"], "importance_seconds": report.get("importance_seconds", 0.0),
            "mean_rel_error": sum(r["rel_error"] for r in layers) / len(layers),
            # lossless layers have infinite SQNR: the mean is over the lossy ones (None if none)
            "mean_sqnr_db": (sum(finite) / len(finite)) if finite else None}
