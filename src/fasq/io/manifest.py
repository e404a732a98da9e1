"""Checkpoint files and their verification: names, safetensors headers, the manifest.

A fasq checkpoint loads only if every fact it holds is verified (`check_checkpoint`):
- `fasq_manifest.json` records each tensor file's size and sha256 and the
  `quantization_config` the checkpoint was written with; the files and config.json's
  quantization_config must match it (an edited config is refused, not silently used);
- the quantized tensors must be exactly those of the config's `modules`, each with the
  shapes its layer config implies (codebooks [C, K, d], scales/offsets only when the
  config has them): read from the safetensors headers, before anything is loaded.
A folder without a manifest (e.g. re-saved by transformers' `save_pretrained`) still gets
the tensor checks, loads with a warning, and `fasq info` calls it unverified.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.config import FORMAT_VERSION, ConfigError, QuantConfig
from ..core.format import packed_row_bytes
from ..core.module import PQLinear
from ..core.transforms import get_transform


WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"  # sharded checkpoints (written by fasq.stream)
MANIFEST_NAME = "fasq_manifest.json"
REPORT_NAME = "fasq_report.json"
_MAX_HEADER = 100 << 20  # safetensors' own limit on a header's size
# a header's dtype names -> torch dtypes (the ones fasq reads)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                      "F8_E5M2": torch.float8_e5m2}


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, incomplete, corrupted or of an unknown version."""


class SafetensorsFileError(ValueError):
    """A safetensors file (or its index) is truncated or not readable; the message names it."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_safetensors_header(path: str | os.PathLike) -> dict:
    """name -> {"dtype", "shape", "data_offsets"} of a safetensors file, checked against
    the file's size (a truncated file is named here, not deep inside a load)."""
    path = Path(path)
    bad = lambda why: SafetensorsFileError(  # noqa: E731
        f"{path}: {why}; the file is truncated or corrupted: copy or download it again")
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < 8:
            raise bad(f"only {size} bytes, too short for a safetensors header")
        n = int.from_bytes(f.read(8), "little")
        if n > min(size - 8, _MAX_HEADER):
            raise bad(f"its header claims {n} bytes but the file has {size}")
        try:
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
            for v in header.values():
                v["shape"], v["dtype"]  # noqa: B018 - every entry must have them
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            raise bad(f"its header is not valid safetensors JSON ({e})") from None
    if 8 + n + end != size:
        raise bad(f"it has {size} bytes but its header describes {8 + n + end}")
    return header


def read_index(path: str | os.PathLike) -> dict[str, str]:
    """The weight map (tensor name -> shard file) of a `model.safetensors.index.json`."""
    try:
        weight_map = json.loads(Path(path).read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
        return weight_map
    except (ValueError, KeyError, TypeError) as e:
        raise SafetensorsFileError(f"{path} is not a valid safetensors index ({type(e).__name__}: {e}); "
                                   "copy or download it again") from None


def tensor_files(folder: Path) -> list[str]:
    """The safetensors files of a model folder (index order, else the single file)."""
    if (folder / INDEX_NAME).is_file():
        files = list(dict.fromkeys(read_index(folder / INDEX_NAME).values()))
        for f in files:
            if not (folder / f).is_file():
                raise SafetensorsFileError(f"{folder / INDEX_NAME} lists {f}, which is missing from {folder}")
        return files
    return [WEIGHTS_NAME] if (folder / WEIGHTS_NAME).is_file() else []


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True for a folder whose config.json declares a fasq quantization_config."""
    try:
        qdict = json.loads((Path(path) / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(qdict, dict) and qdict.get("quant_method") == "fasq"


def write_manifest(folder: Path, files: dict[str, dict], qdict: dict) -> None:
    """The manifest: {file: {bytes, sha256}} plus the quantization_config it was written with."""
    manifest = {"format_version": FORMAT_VERSION, "files": files, "quantization_config": qdict}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))


def file_record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256(path)}


@dataclass
class CheckpointCheck:
    qdict: dict  # config.json's quantization_config
    manifest: bool  # a manifest was found and every file in it matched
    config_covered: bool  # ... and it recorded the quantization_config, which matched

    @property
    def status(self) -> str:
        if not self.manifest:
            return f"unverified: no {MANIFEST_NAME} (files and config not checked)"
        if not self.config_covered:
            return "files verified; config not covered (manifest written by an older fasq)"
        return "verified: files (sha256) and quantization_config match the manifest"


def check_checkpoint(path: str | os.PathLike) -> CheckpointCheck:
    """Every check of the module doc; raises CheckpointError naming the problem."""
    p = Path(path)
    qdict, qcfg = _read_config(p)
    mpath = p / MANIFEST_NAME
    manifest = _read_json(mpath) if mpath.is_file() else None
    covered = False
    if manifest is not None:
        _check_files(p, manifest)
        if "quantization_config" in manifest:
            _check_same_config(p, qcfg, manifest["quantization_config"])
            covered = True
    try:
        _check_tensors(p, qcfg)
    except SafetensorsFileError as e:
        raise CheckpointError(str(e)) from None
    return CheckpointCheck(qdict, manifest is not None, covered)


# (folder, quantization_config) of the checkpoint `verified` checked for the load now running
# in this context: transformers' quantizer, called inside it, does not hash every file again.
_VERIFIED: contextvars.ContextVar[tuple[Path, dict] | None] = contextvars.ContextVar("fasq_verified", default=None)


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """`check_checkpoint`, warning when there was no manifest to check against; returns
    the quantization_config dict. Inside `verified(path)` it returns what that checked."""
    done = _VERIFIED.get()
    if done is not None and done[0] == Path(path).resolve():
        return done[1]
    res = check_checkpoint(path)
    if not res.manifest:
        warnings.warn(f"{path} has no {MANIFEST_NAME}: its files and quantization_config cannot be verified "
                      "(loading it unchecked); re-run `fasq quantize` for a verified checkpoint", stacklevel=2)
    return res.qdict


@contextlib.contextmanager
def verified(path: str | os.PathLike):
    """Verify a checkpoint once for a load: `verify_checkpoint(path)` now, and within the
    block (the loader's own call to it) the same result without reading the files again."""
    token = _VERIFIED.set((Path(path).resolve(), verify_checkpoint(path)))
    try:
        yield _VERIFIED.get()[1]
    finally:
        _VERIFIED.reset(token)


def _read_json(f: Path) -> dict:
    try:
        return json.loads(f.read_text())
    except ValueError as e:
        raise CheckpointError(f"{f} is not valid JSON ({e}); the checkpoint is corrupted") from None


def _read_config(p: Path) -> tuple[dict, QuantConfig]:
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{p} has no config.json: not a model folder")
    qdict = _read_json(p / "config.json").get("quantization_config")
    if not isinstance(qdict, dict) or qdict.get("quant_method") != "fasq":
        raise CheckpointError(f"{p} is not a fasq checkpoint (no fasq quantization_config)")
    try:
        return qdict, QuantConfig.from_dict(qdict)  # raises on unknown fields and newer versions
    except ConfigError as e:
        raise ConfigError(f"{p / 'config.json'}: {e}") from None


def _check_files(p: Path, manifest: dict) -> None:
    for fname, meta in manifest.get("files", {}).items():
        f = p / fname
        if not f.is_file():
            raise CheckpointError(f"{f} is missing: the checkpoint is incomplete")
        if f.stat().st_size != meta["bytes"]:
            raise CheckpointError(f"{f} has {f.stat().st_size} bytes, expected {meta['bytes']}: "
                                  "the checkpoint is truncated; re-run `fasq quantize`")
        if sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{f} does not match its sha256 checksum: the checkpoint is "
                                  "corrupted; re-run `fasq quantize`")


def _check_same_config(p: Path, qcfg: QuantConfig, recorded: dict) -> None:
    try:
        want = QuantConfig.from_dict(recorded).to_dict()
    except ConfigError as e:
        raise CheckpointError(f"{p / MANIFEST_NAME}: its quantization_config is invalid ({e})") from None
    have = qcfg.to_dict()
    if have != want:
        diff = sorted(k for k in want if have.get(k) != want[k])
        if "layer" in diff:
            diff += [f"layer.{k}" for k in want["layer"] if have["layer"].get(k) != want["layer"][k]]
        raise CheckpointError(f"{p / 'config.json'}: its quantization_config differs from the one the checkpoint "
                              f"was written with ({', '.join(diff)}; recorded in {MANIFEST_NAME}); restore "
                              "config.json or re-run `fasq quantize`")


def _check_tensors(p: Path, qcfg: QuantConfig) -> None:
    """The quantized tensors are exactly the config's modules, with the shapes it implies."""
    files = tensor_files(p)
    if not files:
        raise CheckpointError(f"{p} has no {WEIGHTS_NAME} or {INDEX_NAME}: the checkpoint is incomplete")
    header = {}
    for f in files:
        header.update(read_safetensors_header(p / f))
    present = {n.rsplit(".", 1)[0] for n in header if n.endswith((".codes", ".codebooks"))}
    listed = set(qcfg.modules)
    mismatch = "this checkpoint's quantization_config does not match its tensors"
    if present - listed:
        extra = sorted(present - listed)
        raise CheckpointError(f"{p}: {mismatch}: it holds quantized tensors of {extra[0]}"
                              f"{f' and {len(extra) - 1} more' if len(extra) > 1 else ''}, which the config's "
                              "modules do not list; restore config.json or re-run `fasq quantize`")
    for m in sorted(listed):
        problem = _layer_problem(m, qcfg.for_module(m), header)
        if problem:
            raise CheckpointError(f"{p}: {mismatch}: {problem}; restore config.json or re-run `fasq quantize`")


def _layer_problem(m: str, cfg, header: dict) -> str | None:
    """Why module m's stored tensors cannot be a layer of config `cfg` (None if they can)."""
    shape = lambda key: tuple(header[f"{m}.{key}"]["shape"]) if f"{m}.{key}" in header else None  # noqa: E731
    codes, books, scales, offsets = (shape(k) for k in ("codes", "codebooks", "scales", "offsets"))
    if codes is None or books is None:
        return f"{m} is listed as quantized but its codes or codebooks are missing"
    if len(codes) != 2 or len(books) != 3 or header[f"{m}.codes"]["dtype"] != "U8":
        return f"{m}: codes {list(codes)} / codebooks {list(books)} are not the fasq layout"
    if books[1:] != (cfg.K, cfg.d):
        return f"{m}.codebooks is {list(books)}, but the config says K={cfg.K}, d={cfg.d}"
    specs = get_transform(cfg.transform).tensor_specs
    have_t = {n[len(m) + 1:] for n in header if n.startswith(f"{m}.transform_")}
    if have_t != {f"transform_{k}" for k in specs(1)}:
        return (f"{m} has input-transform tensors {sorted(have_t)}, but its config's transform "
                f"{cfg.transform!r} stores {sorted(f'transform_{k}' for k in specs(1))}")
    want_scales, want_offsets = PQLinear.scale_kinds(cfg)
    for key, want, got in (("scales", want_scales, scales), ("offsets", want_offsets, offsets)):
        if want != (got is not None):
            return f"{m} {'lacks' if want else 'has'} {key}, but the config ({_knobs(cfg)}) {'needs' if want else 'has no'} them"
    out, nbytes, bits = codes[0], codes[1], cfg.code_bits
    for M in range(max(1, (nbytes - 1) * 8 // bits + 1), nbytes * 8 // bits + 1):  # widths that pack to nbytes
        in_f = M * cfg.d
        if packed_row_bytes(M, bits) != nbytes:
            continue
        try:
            cfg.check_shape(out, in_f)
        except ConfigError:
            continue
        S = PQLinear.num_scale_groups(cfg, in_f)
        shapes_ok = all(tuple(header[f"{m}.transform_{k}"]["shape"]) == shape for k, (shape, _) in specs(in_f).items())
        if (books[0] == cfg.num_codebooks(in_f) and all(t is None or t == (out, S) for t in (scales, offsets))
                and shapes_ok):
            return None
    return (f"{m}: codes {list(codes)}, codebooks {list(books)}, scales {list(scales or [])} fit no layer "
            f"width with its config ({_knobs(cfg)})")


def _knobs(cfg) -> str:
    return ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items() if k not in ("kmeans_iters", "kmeans_init",
                                                                             "kmeans_sample", "seed"))
