"""`fasq export`: an unquantized model as a plain Hugging Face folder.

Serving engines (vLLM) and other tools read HF folders, not GGUF files; and transformers
refuses `save_pretrained` on a model it loaded from GGUF ("quantized with gguf and is not
serializable"). This writes the tensors by hand, in fp32 or bf16, atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoint import state_for_saving, write_tensors
from .manifest import is_checkpoint, WEIGHTS_NAME
from .outdir import atomic_output_dir, check_output_dir
from .sources import load_model, local_paths, resolve


EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_dense(source: str, out_dir: str | os.PathLike, dtype: str = "float32",
                 overwrite: bool = False) -> Path:
    """Load `source` ('default', a GGUF file, a HF folder or Hub id) and write it to `out_dir`
    as a HF folder (config, generation config, tokenizer, model.safetensors in `dtype`)."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype must be one of {sorted(EXPORT_DTYPES)}, got {dtype!r}")
    inputs = local_paths(source)
    check_output_dir(out_dir, overwrite, inputs)  # fail before the slow part
    if is_checkpoint(resolve(source)[0]):
        raise ValueError(f"{source} is a fasq checkpoint; `fasq export` writes unquantized models "
                         "(serve the checkpoint itself, e.g. `vllm serve CHECKPOINT`)")
    model, tok = load_model(source, dtype=torch.float32)
    tdtype = EXPORT_DTYPES[dtype]
    with atomic_output_dir(out_dir, overwrite, inputs) as tmp:
        # tied tensors (lm_head = embed_tokens) are written once, as transformers does
        write_tensors(state_for_saving(model, tdtype), tmp / WEIGHTS_NAME)
        model.config.dtype = tdtype
        model.config.architectures = [type(model).__name__]  # unset for GGUF sources; vLLM reads it
        if hasattr(model.config, "quantization_config"):  # the GGUF origin: the weights are dense now
            del model.config.quantization_config
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return Path(out_dir)
