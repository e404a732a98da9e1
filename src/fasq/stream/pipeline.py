"""Streaming quantization: a model's tensors read one at a time, quantized, and written
shard by shard into a checkpoint; no model is built, peak host memory stays near one input
shard plus one layer, whatever the model's size.

The checkpoint is the one `model.save_quantized` writes for the same model and config
(the same tensors, byte for byte; tested), sharded like the input: one output shard per
input shard (`model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`), or
`model.safetensors` for a single one.

Resuming: shards are written into a work folder `.NAME.partial` beside the output, and a
state file there records each finished shard (its sha256 and report rows). A run that
stops for any reason leaves that folder; the same command run again checks that the
input and settings are unchanged and continues with the first unfinished shard. The
finished checkpoint replaces the output folder in one rename, as `save_quantized` does.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.config import FORMAT_VERSION, ConfigError, QuantConfig
from ..core.format import STORE_DTYPE, pack_codes, size_summary, stored_layer_size
from ..io.checkpoint import write_checkpoint_files, write_tensors
from ..io.manifest import WEIGHTS_NAME, sha256
from ..io.outdir import check_output_dir, output_lock, replace_dir
from ..io.sources import ModelSourceError, load_model, local_paths
from ..quant.importance import estimate, estimate_streaming
from ..quant.quantize import error_report, quantize_transformed
from ..version import __version__
from .readers import StreamingUnsupported, TiedHeadReader, open_reader


STATE_NAME = "fasq_stream_state.json"
# Architectures whose 2-D weights are not nn.Linear (GPT-2's Conv1D stores W transposed):
# the name rules below would misread them; the in-memory path handles them.
CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "decision_transformer", "imagegpt")
EMBEDDING_NAMES = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings",
                   "shared")


def _config_value(config, key: str, default=None):
    """A config field, from a `PretrainedConfig` or a raw config.json dict."""
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def linear_modules(reader, qcfg: QuantConfig, config) -> list[str]:
    """Names of the modules whose `.weight` is quantized, in the reader's order: the one
    selection of the in-memory and streaming paths. A built model (`memory.ModuleReader`)
    names its nn.Linear modules; files are read by the same rule off the tensor names:
    every 2-D floating `.weight` that is not an embedding. Skipped modules are left out."""
    if hasattr(reader, "linear_names"):  # a built model knows its nn.Linear modules
        return [m for m in reader.linear_names() if not qcfg.is_skipped(m)]
    model_type = _config_value(config, "model_type", "")
    if model_type in CONV1D_MODEL_TYPES:
        raise StreamingUnsupported(f"model type {model_type!r} keeps its projections in Conv1D "
                                   "modules (W transposed), which tensor names do not tell apart")
    out = []
    for _, names in reader.groups:
        for n in names:
            if not n.endswith(".weight"):
                continue
            info, module = reader.info(n), n[: -len(".weight")]
            leaf = module.rsplit(".", 1)[-1]
            if (len(info.shape) != 2 or not info.dtype.is_floating_point or qcfg.is_skipped(module)
                    or any(e in leaf for e in EMBEDDING_NAMES)):
                continue
            out.append(module)
    return out


def dropped_tensors(reader, config, modules) -> set[str]:
    """Tensors the loader ignores: a tied lm_head stored beside the embeddings, unless it is
    quantized (the checkpoint then unties the two)."""
    names = {n for _, g in reader.groups for n in g}
    if _config_value(config, "tie_word_embeddings", False) and "lm_head.weight" in names and "lm_head" not in modules:
        return {"lm_head.weight"}
    return set()


def name_tied_head(reader, config, qcfg: QuantConfig):
    """`reader`, or a `TiedHeadReader` over it when the model ties its head to the input
    embeddings, stores only those, and the head is to be quantized (lm_head not skipped)."""
    if not _config_value(config, "tie_word_embeddings", False) or qcfg.is_skipped("lm_head"):
        return reader
    names = {n for _, g in reader.groups for n in g}
    if "lm_head.weight" in names:  # stored (or a built model's): selected like any other layer
        return reader
    found = sorted(n for n in names if n.endswith("embed_tokens.weight"))
    if len(found) != 1:
        raise ConfigError(f"the model ties lm_head to its input embeddings, but {len(found)} tensors named "
                          "*embed_tokens.weight were found, so fasq cannot tell which one the head shares; "
                          "keep lm_head in --skip")
    return TiedHeadReader(reader, found[0])


@dataclass
class Plan:
    """What a streaming run does: the reader, the modules to quantize and their configs.
    `dtype`: floating tensors are cast to it as read, as loading the model in that dtype
    would (float32: exact for fp16/bf16 sources)."""

    reader: object
    config: object
    qcfg: QuantConfig
    modules: list[str]
    dropped: set[str] = field(default_factory=set)
    dtype: torch.dtype | None = torch.float32  # None: tensors as the reader gives them
    importance: dict[str, torch.Tensor] = field(default_factory=dict)  # column weights per module

    def shard_names(self) -> list[str]:
        n = len(self.reader.groups)
        return [WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    def shapes(self) -> dict[str, tuple[int, int]]:
        return {m: self.reader.info(m + ".weight").shape for m in self.modules}

    @functools.cached_property
    def names(self) -> frozenset[str]:
        """Every tensor of the input."""
        return frozenset(n for _, g in self.reader.groups for n in g)

    def has_bias(self, module: str) -> bool:
        return module + ".bias" in self.names

    @property
    def unties_head(self) -> bool:
        """The model ties lm_head to its input embeddings and lm_head is quantized: the
        checkpoint's config unties them (the embeddings stay unquantized, for lookups)."""
        return bool(_config_value(self.config, "tie_word_embeddings", False)) and "lm_head" in self.modules

    def written_config(self):
        """The model config the checkpoint gets: the source's, untied where `unties_head`."""
        if not self.unties_head:
            return self.config
        if isinstance(self.config, dict):
            return {**self.config, "tie_word_embeddings": False}
        config = copy.deepcopy(self.config)
        config.tie_word_embeddings = False
        return config


def make_plan(source: str, qcfg: QuantConfig, reader=None, dtype: torch.dtype = torch.float32) -> Plan:
    """Open the source, find the layers to quantize and check every one against its config
    (all or nothing, before any work)."""
    reader = reader or open_reader(source)
    config = reader.load_config()
    reader = name_tied_head(reader, config, qcfg)
    modules = linear_modules(reader, qcfg, config)
    if not modules:
        raise ValueError("the model has no linear layers to quantize (all skipped?)")
    for m in modules:
        out_f, in_f = reader.info(m + ".weight").shape
        qcfg.for_module(m).check_shape(out_f, in_f, m)
    return Plan(reader, config, qcfg, modules, dropped_tensors(reader, config, modules), dtype)


def stored_tensors(module: str, q: dict[str, torch.Tensor | None], cfg) -> dict[str, torch.Tensor]:
    """A quantized layer's tensors as a checkpoint stores them (`PQLinear`'s state dict):
    codes bit-packed, floats in fp16."""
    out = {f"{module}.codes": pack_codes(q["codes"].cpu(), cfg.code_bits)}
    for key, t in q.items():  # codebooks, scales, offsets, an input transform's tensors
        if key != "codes" and t is not None:
            out[f"{module}.{key}"] = _stored_plain(t.cpu())
    return out


def _stored_plain(t: torch.Tensor) -> torch.Tensor:
    return (t.to(STORE_DTYPE) if t.is_floating_point() else t).contiguous()


def _peak_rss() -> int:
    """Peak resident memory of this process in bytes (Linux VmHWM, else ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# --- the work folder and its state ---------------------------------------------------------

def work_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def fingerprint(plan: Plan, device) -> dict:
    """What must not change between a run and its resumption."""
    return {"fasq": __version__, "format_version": FORMAT_VERSION, "source": plan.reader.fingerprint(),
            "quantization_config": plan.qcfg.to_dict(), "device": torch.device(device or "cpu").type,
            "dtype": str(plan.dtype),
            "shards": plan.shard_names()}


class State:
    """The finished shards of a run, kept in the work folder (rewritten atomically)."""

    def __init__(self, folder: Path, fp: dict):
        self.folder, self.path, self.fp = folder, folder / STATE_NAME, fp
        self.done: dict[str, dict] = {}

    @classmethod
    def open(cls, folder: Path, fp: dict, log) -> "State":
        """Resume the state in `folder` if it was made with the same fingerprint, else start anew."""
        st = cls(folder, fp)
        if folder.is_dir() and st.path.is_file():
            try:
                saved = json.loads(st.path.read_text())
            except ValueError:
                saved = {}
            if saved.get("fingerprint") == fp:
                st.done = {k: v for k, v in saved.get("done", {}).items() if st._intact(k, v, log)}
                if st.done:
                    log(f"resuming: {len(st.done)} of {len(fp['shards'])} shards already done in {folder}")
                return st
            log(f"{folder} holds a run with other inputs or settings: starting over")
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        st.save()
        return st

    def _intact(self, shard: str, rec: dict, log) -> bool:
        """A finished shard is trusted only if its size and sha256 are the recorded ones."""
        f = self.folder / shard
        if f.is_file() and f.stat().st_size == rec["bytes"] and sha256(f) == rec["sha256"]:
            return True
        log(f"{f} does not match the checksum recorded when it was written: redoing it")
        return False

    def finish(self, shard: str, rec: dict) -> None:
        self.done[shard] = rec
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fp, "done": self.done}, indent=1))
        os.replace(tmp, self.path)


# --- one shard -------------------------------------------------------------------------------

def _natural(name: str):
    """Sort key putting layer 2 before layer 10."""
    import re

    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def set_importance(plan: Plan, load_whole, log) -> None:
    """Fill `plan.importance` (nothing for "none" or when no layer is PQ). A built model
    (`reader.model`) runs the estimate on itself; files run it block by block, or on the
    whole model `load_whole()` gives. A model the random-token pass cannot run gets the
    weights-only "norm" estimate instead, said through `log` and in the saved config."""
    if plan.qcfg.importance == "none" or plan.importance:
        return
    if not any(plan.qcfg.for_module(m).learns_codebooks for m in plan.modules):  # RTN ignores it
        return

    model = getattr(plan.reader, "model", None)

    def run(kind: str) -> dict[str, torch.Tensor]:
        if model is not None:
            return estimate(model, kind, plan.modules)
        return estimate_streaming(load_whole, kind, plan.reader, plan.shapes(), dtype=plan.dtype,
                                  config=plan.config)

    try:
        plan.importance = run(plan.qcfg.importance)
    except (ModelSourceError, OSError, ValueError, KeyError, AttributeError, TypeError, RuntimeError,
            NotImplementedError) as e:
        if plan.qcfg.importance != "random-tokens":
            raise
        log(f"the random-token importance estimate needs to run the model, which failed here "
            f"({type(e).__name__}: {e}); using the norm-weight estimate (importance 'norm')")
        plan.qcfg = dataclasses.replace(plan.qcfg, importance="norm")
        plan.importance = run("norm")


def quantize_layer(plan: Plan, module: str, W: torch.Tensor, device=None):
    """(tensors, report row) of one linear weight W [out, in]: the quantize-and-report step
    of both paths. `tensors`: codes, codebooks, scales, offsets and the input transform's
    tensors, unpacked, on `device` (default: W's)."""
    cfg = plan.qcfg.for_module(module)
    if device is not None:
        W = W.to(device)  # once: k-means and the error report run where the codes are made
    q, What = quantize_transformed(W, cfg, name=module, device=device, importance=plan.importance.get(module))
    out_f, in_f = W.shape
    row = {"name": module, "out": out_f, "in": in_f,
           "bits_per_weight": stored_layer_size(out_f, in_f, cfg, plan.has_bias(module)).bits_per_weight,
           **error_report(W, What)}
    return q, row


def write_shard(plan: Plan, names: list[str], path: Path, device, bar) -> dict:
    """Quantize or copy the tensors `names` into the safetensors file `path` (written under
    a temporary name, then renamed); returns the shard's record for the state file."""
    modules = set(plan.modules)
    stored, rows, other, seconds = {}, [], 0, 0.0
    for name in names:
        info = plan.reader.info(name)
        if name not in plan.dropped:
            bar.set_postfix_str(name, refresh=False)
            t = plan.reader.read(name)
            if t.is_floating_point():
                t = t.to(plan.dtype)
            module, _, leaf = name.rpartition(".")
            if leaf == "weight" and module in modules:
                t0 = time.perf_counter()
                q, row = quantize_layer(plan, module, t, device)
                seconds += time.perf_counter() - t0
                stored.update(stored_tensors(module, q, plan.qcfg.for_module(module)))
                rows.append(row)
            else:
                stored[name] = _stored_plain(t)
                if t.is_floating_point() and not (leaf == "bias" and module in modules):
                    other += t.numel()  # a quantized layer's bias counts in its LayerSize
            del t
        bar.update(info.nbytes)
    plan.reader.close()
    return {**write_tensors(stored, path), "layers": rows, "other_elements": other,
            "seconds": seconds, "tensors": {k: v.numel() * v.element_size() for k, v in stored.items()}}


# --- the whole run ---------------------------------------------------------------------------

def quantize_streaming(source: str, out_dir: str | os.PathLike, qcfg: QuantConfig, device=None,
                       overwrite: bool = False, progress: bool = True, plan: Plan | None = None,
                       extra_report: dict | None = None, log=None) -> dict:
    """Quantize `source` ('default', a HF folder, a .gguf file, a Hub id) into the checkpoint
    folder `out_dir`, tensor by tensor; returns the report (as `quantize_model` + `save_quantized`
    would write it, plus a "streaming" entry). Resumes an interrupted run of the same command."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    out = check_output_dir(out_dir, overwrite, local_paths(source))  # fail before the slow part
    plan = plan or make_plan(source, qcfg)
    with output_lock(out):  # one run per output: a second one would share the work folder
        check_output_dir(out, overwrite, local_paths(source))  # a run that held the lock may have written it
        return _run(plan, source, out, device, progress, extra_report, log)


def _run(plan: Plan, source: str, out: Path, device, progress: bool, extra_report, log) -> dict:
    from tqdm.auto import tqdm

    t_imp = time.perf_counter()
    set_importance(plan, lambda: load_model(source, dtype=plan.dtype)[0], log)  # before the fingerprint: it may fall back to another estimate
    t_imp = time.perf_counter() - t_imp
    work = work_dir(out)
    state = State.open(work, fingerprint(plan, device), log)
    shards = plan.shard_names()
    sizes = [sum(plan.reader.info(n).nbytes for n in names) for _, names in plan.reader.groups]
    resumed = [s for s in shards if s in state.done]
    t0 = time.perf_counter()
    with tqdm(total=sum(sizes), initial=sum(b for s, b in zip(shards, sizes) if s in state.done), unit="B",
              unit_scale=True, unit_divisor=1024, desc="quantizing", disable=not progress) as bar:
        for shard, (_, names) in zip(shards, plan.reader.groups):
            if shard not in state.done:
                state.finish(shard, write_shard(plan, names, work / shard, device, bar))
    report = _report(plan, state, source, extra_report)
    report["importance_seconds"] = t_imp  # the estimate, before the first layer (in "seconds" too)
    report["seconds"] += t_imp
    report["streaming"] = {"shards": len(shards), "resumed_shards": len(resumed),
                           "wall_seconds": time.perf_counter() - t0, "peak_rss_bytes": _peak_rss()}
    if torch.device(device or "cpu").type == "cuda":
        report["streaming"]["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    _finish(plan, state, work, out, report)
    return report


def _report(plan: Plan, state: State, source: str, extra: dict | None) -> dict:
    recs = [state.done[s] for s in plan.shard_names()]
    shapes = plan.shapes()
    q = {m: stored_layer_size(*shapes[m], plan.qcfg.for_module(m), plan.has_bias(m)) for m in plan.modules}
    rows = sorted((r for rec in recs for r in rec["layers"]), key=lambda r: _natural(r["name"]))
    return {"seconds": sum(rec["seconds"] for rec in recs), "layers": rows,
            "size": size_summary(q, sum(rec["other_elements"] for rec in recs)), **(extra or {}),
            "source": source}


def _finish(plan: Plan, state: State, work: Path, out: Path, report: dict) -> None:
    """Config, tokenizer, report, index and manifest into the work folder, then rename it."""
    shards = plan.shard_names()
    index = None
    if len(shards) > 1:
        weight_map = {t: s for s in shards for t in state.done[s]["tensors"]}
        total = sum(b for s in shards for b in state.done[s]["tensors"].values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    qcfg = dataclasses.replace(plan.qcfg, modules=tuple(sorted(plan.modules, key=_natural)))
    path, kw = plan.reader.tokenizer_source
    try:
        tokenizer = plan.reader.load_tokenizer()
    except (OSError, ValueError, KeyError):
        tokenizer = None
    write_checkpoint_files(work, plan.written_config(), qcfg.to_dict(), {s: state.done[s] for s in shards}, report,
                           _generation_config(plan), tokenizer, None if kw else path, STORE_DTYPE, index)
    (work / STATE_NAME).unlink()
    replace_dir(work, out)


def _generation_config(plan: Plan):
    """The source's generation config, else one made from its model config (None for a
    config transformers does not know)."""
    if isinstance(plan.config, dict):
        return None
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(plan.reader.tokenizer_source[0])
    except OSError:
        return GenerationConfig.from_model_config(plan.config)
