"""Baselines for the accuracy study: HQQ, GPTQ and AWQ through their maintained libraries.

- HQQ: the `hqq` package (calibration-free, half-quadratic optimisation of the zero
  point and scale of each group).
- GPTQ and AWQ: `llmcompressor` (vLLM's maintained implementation of both; GPTQ with its
  default static activation ordering and dampening, AWQ followed by round-to-nearest of
  the smoothed weights, as llmcompressor documents it).

All three quantize every linear layer fasq quantizes (the tied embedding / lm_head stay
FP16) to `bits`-bit integers, asymmetric, with one (scale, zero point) per group of
`group_size` input columns (0: one per output row). The result is a plain Hugging Face
model whose weights are the dequantized values ("fake quantization"), so every
evaluation in fasq runs on it unchanged; the size that the library's own storage format
would take is computed by `group_quant_size` and saved beside it.

GPTQ and AWQ need calibration text. It must not overlap the evaluation sets, so it is
PIQA's unlabeled *test* split (goals and both solutions; PIQA is scored on its validation
split): `calibration_texts`. The libraries are optional (`pip install 'fasq[baselines]'`);
llmcompressor pins its own transformers range, so the Makefile installs them in a
separate environment (`make baselines-env`).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from ..core.config import DEFAULT_SKIP, QuantConfig
from ..core.convert import quantizable_linears
from ..core.format import unquantized_elements
from ..io.checkpoint import state_for_saving, write_tensors
from ..io.manifest import WEIGHTS_NAME
from ..io.outdir import atomic_output_dir
from ..io.sources import load_model
from .data import default_data_dir


LIBRARY = {"hqq": "hqq", "gptq": "llmcompressor", "awq": "llmcompressor"}  # method -> package
METHODS = tuple(LIBRARY)
# bits of one stored zero point: HQQ keeps a float zero (fp16 by default), llmcompressor's
# packed format stores integer zero points at the weight bit width.
ZERO_BITS = {"hqq": 16, "gptq": None, "awq": None}
INFO_NAME = "fasq_baseline.json"
CALIB_FILE = Path("piqa") / "tests.jsonl"


class BaselineError(RuntimeError):
    pass


def _require(module: str, method: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise BaselineError(f"the {method} baseline needs the {module.split('.')[0]!r} package: "
                            "pip install 'fasq[baselines]' (or `make baselines-env`)") from e


# --- sizes -------------------------------------------------------------------------------

def group_quant_size(model: nn.Module, layers: list[tuple[str, nn.Linear]], bits: int, group_size: int,
                     zero_bits: int | None = 16) -> dict:
    """Stored size of `bits`-bit group quantization of `layers`, the rest of `model` in FP16.

    Per layer: out*in codes of `bits` bits, and per (row, group) a 16-bit scale and a zero
    point of `zero_bits` bits (None: `bits`); the rest as `fasq.core.format.size_table` counts it.
    """
    zb = bits if zero_bits is None else zero_bits
    qnames = {n for n, _ in layers}
    quant_bits = qweights = 0
    for _, lin in layers:
        out_f, in_f = lin.weight.shape
        g = group_size or in_f
        if in_f % g:
            raise BaselineError(f"group size {g} does not divide a layer's {in_f} input columns; "
                                "choose a divisor (e.g. 32, 64, 192 for 576 and 1536) or 0 for per row")
        qweights += out_f * in_f
        quant_bits += out_f * in_f * bits + out_f * (in_f // g) * (16 + zb)
    # biases of the quantized layers stay fp16, as everything else does
    other = unquantized_elements(model, lambda name: name.endswith(".weight") and name[:-7] in qnames)
    total = quant_bits / 8 + 2 * other
    return {"bits_per_weight": quant_bits / qweights, "quantized_weights": qweights,
            "total_bytes": total, "fp16_bytes": 2 * (qweights + other),
            "size_fraction_of_fp16": total / (2 * (qweights + other))}


# --- calibration ---------------------------------------------------------------------------

def calibration_texts(data_dir: str | Path) -> list[str]:
    """PIQA's unlabeled test rows as text: the goal, then both candidate solutions."""
    path = Path(data_dir) / CALIB_FILE
    if not path.is_file():
        raise BaselineError(f"calibration text {path} is missing: GPTQ/AWQ calibrate on PIQA's unlabeled "
                            "test split (piqa/tests.jsonl under --data-dir)")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [f"{r['goal']}\n{r['sol1']}\n{r['sol2']}" for r in rows]


def calibration_batches(tokenizer, texts: list[str], samples: int = 128, seqlen: int = 512) -> torch.Tensor:
    """[samples, seqlen] token ids: the texts joined by EOS and cut into consecutive windows."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        if len(ids) >= samples * seqlen:
            break
    if len(ids) < samples * seqlen:
        raise BaselineError(f"calibration text holds {len(ids)} tokens, fewer than {samples} x {seqlen}; "
                            "lower --calib-samples or --calib-seqlen")
    return torch.tensor(ids[: samples * seqlen]).view(samples, seqlen)


# --- methods -------------------------------------------------------------------------------

@torch.no_grad()
def quantize_hqq(layers: list[tuple[str, nn.Linear]], bits: int, group_size: int) -> None:
    """HQQ with the library's optimiser; scale and zero kept in fp16 as HQQ stores them."""
    hq = _require("hqq.core.quantize", "hqq")
    for _, lin in layers:
        W = lin.weight.data.float()
        Wq, meta = hq.Quantizer.quantize(W, nbits=bits, channel_wise=True, group_size=group_size or W.shape[1],
                                         optimize=True, round_zero=False, axis=1, bitpack=False,
                                         compute_dtype=torch.float32, device=str(W.device))
        for k in ("scale", "zero"):  # stored as fp16 in HQQ checkpoints
            meta[k] = meta[k].to(torch.float16).float()
        lin.weight.data = hq.Quantizer.dequantize(Wq, meta).reshape(W.shape).to(lin.weight.dtype)


def _llmc_recipe(method: str, bits: int, group_size: int, ignore: list[str], awq_mappings=None):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=False,
                            strategy="group" if group_size else "channel", group_size=group_size or None)
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=args)}
    if method == "gptq":
        return [GPTQModifier(config_groups=groups, ignore=ignore)]
    from llmcompressor.modifiers.transform.awq import AWQModifier

    # mappings=None: llmcompressor's own per-architecture defaults (Llama, Qwen, ...)
    return [AWQModifier(mappings=awq_mappings), QuantizationModifier(config_groups=groups, ignore=ignore)]


@torch.no_grad()
def _fake_quantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state with each quantized weight replaced by its dequantized value."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    state = {}
    for name, m in model.named_modules():
        scheme = getattr(m, "quantization_scheme", None)
        if scheme is None or scheme.weights is None or not hasattr(m, "weight_scale"):
            continue
        # scales are stored in fp16 (the model dtype of a real checkpoint)
        scale = m.weight_scale.to(torch.float16).float()
        g_idx = getattr(m, "weight_g_idx", None)  # set only by actorder="group", which we do not use
        if g_idx is not None and not torch.equal(g_idx, torch.arange(g_idx.numel()) // scheme.weights.group_size):
            raise BaselineError(f"{name}: permuted groups (g_idx) are not supported")
        w = fake_quantize(m.weight.float(), scale, m.weight_zero_point, scheme.weights)
        state[f"{name}.weight"] = w.to(m.weight.dtype)
    return state


def quantize_llmcompressor(model: nn.Module, tokenizer, calib: torch.Tensor, method: str, bits: int,
                           group_size: int, skip: list[str], awq_mappings=None) -> dict[str, torch.Tensor]:
    """Run GPTQ or AWQ with llmcompressor; returns the dequantized weights by name.

    `model` is modified in place (AWQ leaves its smoothed, unrounded weights in it).
    `awq_mappings`: llmcompressor AWQMapping list for architectures it has no defaults for.
    """
    _require("llmcompressor", method)
    from datasets import Dataset
    from llmcompressor import oneshot

    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    with _no_pinning_without_accelerator():
        oneshot(model=model, tokenizer=tokenizer, dataset=ds, recipe=_llmc_recipe(method, bits, group_size, skip, awq_mappings),
                num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1],
                shuffle_calibration_samples=False)
    return _fake_quantized_state(model)


@contextlib.contextmanager
def _no_pinning_without_accelerator():
    """llmcompressor 0.14's AWQ pins its activation cache unconditionally, which raises
    "Cannot access accelerator device" on a CPU-only torch; pinning only speeds up copies
    to a GPU, so without one it is skipped (nothing else changes)."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.cuda.is_available():
        yield
        return
    pin = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *a, **k: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = pin


def quantize_baseline(source: str, method: str, bits: int, group_size: int, data_dir: str | Path | None = None,
                      calib_samples: int = 128, calib_seqlen: int = 512, skip=None):
    """(model with dequantized weights, tokenizer, info) for one baseline."""
    if method not in METHODS:
        raise BaselineError(f"unknown baseline {method!r}; choose one of {', '.join(METHODS)} "
                            "(RTN is `fasq quantize --method rtn`)")
    _require(LIBRARY[method], method)  # fail before the slow part
    skip = tuple(skip) if skip is not None else DEFAULT_SKIP
    t0 = time.perf_counter()
    model, tok = load_model(source)
    layers = quantizable_linears(model, QuantConfig(skip=skip))
    size = group_quant_size(model, layers, bits, group_size, ZERO_BITS[method])  # validates group_size
    info = {"method": method, "bits": bits, "group_size": group_size, "source": source, **size}
    if method == "hqq":
        quantize_hqq(layers, bits, group_size)
    else:
        calib = calibration_batches(tok, calibration_texts(data_dir or default_data_dir()),
                                    calib_samples, calib_seqlen)
        names = {n for n, _ in layers}
        ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in names]
        with tempfile.TemporaryDirectory(prefix="fasq-dense-") as dense:
            # llmcompressor re-reads the config from model.name_or_path and refuses models
            # that were quantized on disk (the GGUF default): hand it a plain dense copy
            # (write_dense also drops the GGUF quantization_config from `model`, which
            # then receives the results: llmcompressor leaves its wrappers on its copy)
            write_dense(model, tok, dense)
            qmodel, qtok = load_model(dense)
            state = quantize_llmcompressor(qmodel, qtok, calib, method, bits, group_size, ignore)
            model = _with_weights(model, qmodel, state)
        info["calibration"] = {"text": str(CALIB_FILE), "samples": calib_samples, "seqlen": calib_seqlen}
    info["library"] = _library_version(method)
    info["seconds"] = time.perf_counter() - t0
    return model, tok, info


@torch.no_grad()
def _with_weights(model: nn.Module, qmodel: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """`model` holding qmodel's tensors (AWQ also rescales norms) and the dequantized `weights`."""
    qstate = qmodel.state_dict()
    state = model.state_dict()
    for k in state:
        if k in weights:
            state[k] = weights[k]
        elif k in qstate:
            state[k] = qstate[k].to(state[k].dtype)
    model.load_state_dict(state)
    return model


def _library_version(method: str) -> str:
    from importlib.metadata import version

    return f"{LIBRARY[method]} {version(LIBRARY[method])}"


def write_dense(model: nn.Module, tok, folder: str | Path) -> None:
    """A plain HF folder with fp32 weights (no quantization_config)."""
    folder = Path(folder)
    # written by hand: transformers refuses save_pretrained on a model loaded from GGUF
    write_tensors(state_for_saving(model, torch.float32), folder / WEIGHTS_NAME)
    model.config.dtype = torch.float32
    if hasattr(model.config, "quantization_config"):  # e.g. the GGUF origin: the weights are dense now
        del model.config.quantization_config
    model.config.save_pretrained(folder)
    tok.save_pretrained(folder)


def save_baseline(model: nn.Module, tok, info: dict, out_dir: str | Path, overwrite: bool = False,
                  inputs=()) -> Path:
    """write_dense + fasq_baseline.json, atomically (temporary sibling folder, then rename);
    refused on top of `inputs` (the local paths the model was read from)."""
    with atomic_output_dir(out_dir, overwrite, inputs) as tmp:
        write_dense(model, tok, tmp)
        (tmp / INFO_NAME).write_text(json.dumps(info, indent=1))
    return Path(out_dir)
