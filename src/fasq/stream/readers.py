"""Read a model's tensors one at a time, without building the model.

A reader gives the tensor names in groups (an input shard of a safetensors folder, or a
run of consecutive tensors of a GGUF file), their shapes, and each tensor on request:
    names and groups  -> what exists and in which output shard it goes
    info(name)        -> TensorInfo(shape, dtype, nbytes)
    read(name)        -> the tensor as the in-memory loader would see it (float32 for GGUF,
                         the stored dtype for safetensors)
Readers also give the model's config (a `PretrainedConfig`, or the raw config.json dict
for architectures this transformers does not know) and the tokenizer source.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..io.manifest import INDEX_NAME as INDEX_FILE
from ..io.manifest import SAFETENSORS_DTYPES, read_safetensors_header, tensor_files
from ..io.manifest import WEIGHTS_NAME as SINGLE_FILE
from ..io.sources import ModelSourceError, resolve

# GGUF files are one file: their tensors are cut into output shards of about this many
# input bytes (dequantized to fp32), which is also the granularity of resuming.
GGUF_GROUP_BYTES = 2 << 30


class StreamingUnsupported(ModelSourceError):
    """This source cannot be streamed (no safetensors, Conv1D layers): load it whole instead."""


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int  # bytes of the tensor as read (what the progress bar counts)



class TiedHeadReader:
    """A reader of a model whose output head is tied to its input embeddings and stored only
    as them, with the head named: `lm_head.weight` reads the embedding matrix (listed after it,
    in its group), so the head can be quantized on its own; the checkpoint then unties the
    two (the embeddings stay as they are, for lookups). Everything else is the wrapped reader's."""

    HEAD = "lm_head.weight"

    def __init__(self, reader, embedding: str):
        self._reader, self._embedding = reader, embedding
        self.groups = [(g, [m for n in names for m in ((n, self.HEAD) if n == embedding else (n,))])
                       for g, names in reader.groups]

    def info(self, name: str) -> TensorInfo:
        return self._reader.info(self._embedding if name == self.HEAD else name)

    def read(self, name: str) -> torch.Tensor:
        return self._reader.read(self._embedding if name == self.HEAD else name)

    def __getattr__(self, name: str):  # close, fingerprint, config, tokenizer: the wrapped reader's
        return getattr(self._reader, name)


class SafetensorsReader:
    """A Hugging Face folder: model.safetensors, or shards listed in model.safetensors.index.json."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        files = tensor_files(self.folder)  # index order; a broken index or missing shard is named
        if not files:
            raise StreamingUnsupported(f"{self.folder} has neither {SINGLE_FILE} nor {INDEX_FILE}: streaming "
                                       "quantization reads safetensors")
        self.files = files
        self._info: dict[str, TensorInfo] = {}
        self._where: dict[str, str] = {}
        self.groups: list[tuple[str, list[str]]] = []
        for fname in files:
            header = read_safetensors_header(self.folder / fname)  # every file checked before any work
            names = sorted(header)
            for n in names:
                h = header[n]
                dtype = SAFETENSORS_DTYPES.get(h["dtype"])
                if dtype is None:
                    raise ModelSourceError(f"{fname}: tensor {n} has dtype {h['dtype']}, which fasq cannot read")
                start, end = h["data_offsets"]
                self._info[n] = TensorInfo(tuple(h["shape"]), dtype, end - start)
                self._where[n] = fname
            self.groups.append((fname, names))
        self._open: tuple[str, object] | None = None

    def info(self, name: str) -> TensorInfo:
        return self._info[name]

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        fname = self._where[name]
        if self._open is None or self._open[0] != fname:  # one shard open (mapped) at a time
            self._open = (fname, safe_open(str(self.folder / fname), framework="pt"))
        return self._open[1].get_tensor(name)

    def close(self) -> None:
        self._open = None

    def fingerprint(self) -> dict:
        """What identifies the input: every file's size and modification time."""
        files = self.files + ([INDEX_FILE] if (self.folder / INDEX_FILE).is_file() else [])
        return {"path": str(self.folder.resolve()),
                "files": {f: [(self.folder / f).stat().st_size, (self.folder / f).stat().st_mtime_ns] for f in files}}

    def load_config(self):
        return load_config(str(self.folder), {})

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.folder))

    tokenizer_source = property(lambda self: (str(self.folder), {}))


class GGUFTensorReader:
    """A GGUF file: tensors dequantized to float32 one at a time and renamed to the
    architecture's Hugging Face names the way transformers' GGUF loader does (its tensor
    processors undo llama.cpp's permutations). The name map needs the architecture's
    parameter names, taken from a model skeleton on the meta device (no memory, no weights)."""

    def __init__(self, path: str | os.PathLike):
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, read_field

        self.path = Path(path)
        try:
            self.reader = GGUFReader(str(self.path))
        except (ValueError, OSError, IndexError, KeyError) as e:  # what gguf raises on a cut or foreign file
            raise ModelSourceError(f"{self.path} is not a readable GGUF file ({type(e).__name__}: {e}); "
                                   "it is truncated or corrupted: copy or download it again") from None
        with self._parsed_once():
            self.config = load_config(str(self.path.parent), {"gguf_file": self.path.name})
        arch = read_field(self.reader, "general.architecture")[0]
        self.processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=self.config.to_dict())
        self.mapping = _gguf_to_hf_names(self.config, self.processor)
        self._tensors, self._info = {}, {}
        for t in self.reader.tensors:
            hf = self.mapping.get(t.name)
            if hf is None:
                continue  # transformers' loader skips these too
            shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
            self._tensors[hf] = t
            self._info[hf] = TensorInfo(shape, torch.float32, 4 * int(t.n_elements))
        self.groups = _size_groups(list(self._tensors), self._info, GGUF_GROUP_BYTES)
        self.files = [self.path.name]

    def info(self, name: str) -> TensorInfo:
        return self._info[name]

    def read(self, name: str) -> torch.Tensor:
        import numpy as np
        from gguf import dequantize

        t = self._tensors[name]
        weights = dequantize(t.data, t.tensor_type)
        res = self.processor.process(weights=weights, name=t.name, tensor_key_mapping=self.mapping,
                                     parsed_parameters={"config": {}, "tensors": {}})
        return torch.from_numpy(np.copy(res.weights)).to(torch.float32)

    def close(self) -> None:
        pass

    def fingerprint(self) -> dict:
        st = self.path.stat()
        return {"path": str(self.path.resolve()), "files": {self.path.name: [st.st_size, st.st_mtime_ns]}}

    def load_config(self):
        return self.config

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        with self._parsed_once():
            return AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)

    @contextlib.contextmanager
    def _parsed_once(self):
        """transformers parses the GGUF file again for the config and the tokenizer (seconds
        each: the vocabulary is a list of strings); hand it the reader parsed already."""
        import gguf

        original = gguf.GGUFReader

        def reuse(path, *args, **kwargs):
            same = not args and not kwargs and Path(path).resolve() == self.path.resolve()
            return self.reader if same else original(path, *args, **kwargs)

        gguf.GGUFReader = reuse
        try:
            yield
        finally:
            gguf.GGUFReader = original

    tokenizer_source = property(lambda self: (str(self.path.parent), {"gguf_file": self.path.name}))


def _size_groups(names: list[str], info: dict[str, TensorInfo], limit: int) -> list[tuple[str, list[str]]]:
    """Consecutive runs of tensors of at most `limit` bytes (a bigger tensor alone)."""
    groups, cur, size = [], [], 0
    for n in names:
        if cur and size + info[n].nbytes > limit:
            groups.append(cur)
            cur, size = [], 0
        cur.append(n)
        size += info[n].nbytes
    if cur:
        groups.append(cur)
    return [(f"part{i}", g) for i, g in enumerate(groups)]


def _gguf_to_hf_names(config, processor) -> dict[str, str]:
    """transformers' GGUF -> HF tensor name map, from a meta-device model skeleton. Its
    walk over every submodule rebuilds gguf's name table each time (~30 ms x hundreds of
    modules); the table is built once here (same arguments, same table)."""
    import functools

    import gguf
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        return get_gguf_hf_weights_map(skeleton, processor)
    finally:
        gguf.get_tensor_name_map = original


def load_config(path: str, kw: dict):
    """The model's `PretrainedConfig`, or config.json as a dict when this transformers does
    not know the architecture (the checkpoint is then written from the dict)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, **kw)
    except (ValueError, KeyError) as e:
        f = Path(path) / "config.json"
        if kw or not f.is_file():
            raise ModelSourceError(f"could not read the model config of {path}: {e}") from e
        return json.loads(f.read_text())


def open_reader(source: str):
    """A reader for `default`, a local HF folder with safetensors, a .gguf file, or a Hub id
    (downloaded first: config, tokenizer and safetensors files only)."""
    path, kw = resolve(source)
    if "gguf_file" in kw:
        return GGUFTensorReader(Path(path) / kw["gguf_file"])
    if not Path(path).is_dir():
        path = _download(path)
    return SafetensorsReader(path)


def _download(repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - transformers depends on huggingface_hub
        raise ModelSourceError(f"{repo_id!r} is a Hub id and huggingface_hub is not installed") from e
    try:
        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model",
                                                          "*.txt", "*.tiktoken"])
    except Exception as e:  # network, authentication, unknown repository
        raise ModelSourceError(f"could not download {repo_id!r} from the Hugging Face Hub: {e}") from e
