"""vLLM plugin: `vllm serve CHECKPOINT` / `vllm.LLM(CHECKPOINT)` load fasq checkpoints.

vLLM calls `register()` through the `vllm.general_plugins` entry point (declared in
pyproject.toml) in every process it starts, sometimes twice; registration is idempotent.
Importing this package does not import vLLM: only `register()` does.
"""

from __future__ import annotations

from ...core.config import QUANT_METHOD


def register() -> None:
    """Register the "fasq" quantization method with vLLM (once per process)."""
    from vllm.model_executor.layers import quantization as q

    from .method import FasqVllmConfig

    if getattr(q, "_CUSTOMIZED_METHOD_TO_QUANT_CONFIG", {}).get(QUANT_METHOD) is FasqVllmConfig:
        return  # already registered in this process
    q.register_quantization_config(QUANT_METHOD)(FasqVllmConfig)
