"""The argument parser of every command."""

from __future__ import annotations

import argparse

from ..core.config import IMPORTANCE, PQConfig, QuantConfig
from ..quant.solver import DEFAULT_PROXY, IMPORTANCE as PROXIES
from .common import DTYPES


def _add_model_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0, ... (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="compute dtype (default float32)")


def build_parser() -> argparse.ArgumentParser:
    dflt = PQConfig()
    ap = argparse.ArgumentParser(prog="fasq", description="Calibration-free product quantization of LLMs.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize a model and save a checkpoint")
    q.add_argument("model", help="'default', a HF folder, a .gguf file or a Hub id")
    q.add_argument("--out", required=True, help="output checkpoint folder")
    q.add_argument("--method", choices=["fasq", "rtn"], default="fasq")
    q.add_argument("--subvector-dim", "-d", type=int, default=dflt.d, help=f"FASQ sub-vector length d (default {dflt.d})")
    q.add_argument("--codebook-size", "-K", type=int, default=dflt.K, help=f"FASQ centroids per codebook K (default {dflt.K})")
    q.add_argument("--scope", choices=["matrix", "group", "subspace"], default=dflt.codebook_scope,
                   help="codebook scope (default %(default)s)")
    q.add_argument("--codebook-group", type=int, default=dflt.codebook_group,
                   help="subspaces per codebook (at least) with --scope group (default %(default)s)")
    q.add_argument("--scale", choices=["none", "absmax", "rms", "minmax"], default=dflt.scale,
                   help="per-row(-group) normalisation (default %(default)s)")
    q.add_argument("--scale-group", type=int, default=dflt.scale_group,
                   help="input columns per scale, 0 = one per row (default %(default)s)")
    q.add_argument("--kmeans-iters", type=int, default=dflt.kmeans_iters)
    q.add_argument("--kmeans-init", choices=["kmeans++", "random"], default=dflt.kmeans_init)
    q.add_argument("--kmeans-sample", type=int, default=dflt.kmeans_sample,
                   help="sub-vectors per codebook used to fit k-means, 0 = all (default %(default)s)")
    q.add_argument("--seed", type=int, default=dflt.seed)
    q.add_argument("--bits", type=int, default=4, help="RTN bits (with --method rtn)")
    q.add_argument("--group-size", type=int, default=64, help="RTN group size, 0 = per row (with --method rtn)")
    q.add_argument("--target-bits", type=float, default=None, help="let the solver choose per-layer (d, K) "
                   "to land within 1%% below this many bits per quantized weight (all overhead)")
    q.add_argument("--target-size", type=float, default=None, help="let the solver choose per-layer (d, K) "
                   "to land within 1%% below this fraction of the FP16 model (whole checkpoint)")
    q.add_argument("--candidates", default=None, metavar="d2K256,d3K512,...",
                   help="the solver's per-layer choices (matrix codebooks, absmax scales); "
                        "default: fasq.quant.solver.DEFAULT_CANDIDATES")
    q.add_argument("--proxy", choices=list(PROXIES), default=None,
                   help="what the solver minimises per layer (with --target-bits/--target-size): output = "
                        "relative output error, each input channel's squared weight error weighted by the "
                        "--importance estimate (random token ids, no text); rel = relative weight error; "
                        f"output-sq / sq: the same unnormalised (default {DEFAULT_PROXY}: output measured "
                        "worse on the default model, see the README)")
    q.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="choose the largest codebook and scale groups up to the ones asked that split "
                        "evenly across N ranks in every layer, for serving with vLLM at tensor parallel N")
    q.add_argument("--importance", choices=list(IMPORTANCE), default=QuantConfig().importance,
                   help="input-channel importance weighting the k-means and scale fits, from the "
                        "model alone, no text (see fasq.quant.importance; default %(default)s)")
    q.add_argument("--skip", nargs="*", default=None, help="module name patterns left unquantized "
                   "(default: embed_tokens lm_head; leaving lm_head out quantizes the head as --lm-head same)")
    q.add_argument("--lm-head", choices=["dense", "rtn8", "same"], default="dense",
                   help="the output head: dense (default: unquantized), rtn8 (RTN 8-bit, groups of 64 "
                        "columns: decodes on the CPU's int8 path with no lookup; as llama.cpp keeps its "
                        "head at 6-8 bits) or same (the other layers' config; 4-bit heads cost the default "
                        "model about 5 %% perplexity). A head tied to the input embeddings is untied: the "
                        "embeddings stay unquantized, for lookups. Such checkpoints load in transformers, "
                        "not yet in the vLLM plugin")
    q.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in --out")
    q.add_argument("--in-memory", action="store_true", help="load the whole model first (default: read, "
                   "quantize and write the tensors one at a time, resuming an interrupted run); needed "
                   "for checkpoints without safetensors and for Conv1D models such as GPT-2")
    q.add_argument("--json", action="store_true", help="print one JSON object (report) instead of tables")
    _add_model_opts(q)

    e = sub.add_parser("eval", help="evaluate a model or checkpoint")
    e.add_argument("model")
    e.add_argument("--ppl", action="store_true", help="WikiText-2 perplexity (the default without --tasks)")
    e.add_argument("--windows", type=int, default=10, help="number of windows, 0 = all (default 10)")
    e.add_argument("--seqlen", type=int, default=2048, help="window length in tokens (default 2048)")
    e.add_argument("--data-dir", default=None, help="evaluation data folder (default $FASQ_DATA_DIR or ../shared/data)")
    e.add_argument("--tasks", default=None, help="comma list of lm-eval zero-shot tasks, "
                   "e.g. arc_easy,arc_challenge,piqa (local files: see docs/tasks.md)")
    e.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples per task")
    e.add_argument("--batch-size", type=int, default=8, help="zero-shot batch size (default 8)")
    e.add_argument("--compare", default=None, help="also evaluate this reference model and print both")
    e.add_argument("--json", action="store_true")
    _add_model_opts(e)

    i = sub.add_parser("info", help="config, size table and per-layer errors of a checkpoint")
    i.add_argument("checkpoint")
    i.add_argument("--json", action="store_true")

    b = sub.add_parser("baseline", help="quantize with a baseline library (HQQ, GPTQ, AWQ) and save "
                       "the dequantized model as a plain HF folder")
    b.add_argument("method", choices=["hqq", "gptq", "awq"])
    b.add_argument("model", help="'default', a HF folder, a .gguf file or a Hub id")
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--bits", type=int, default=4)
    b.add_argument("--group-size", type=int, default=192, help="input columns per (scale, zero), 0 = one "
                   "per row (default %(default)s: divides 576 and 1536, >= the usual 128)")
    b.add_argument("--data-dir", default=None, help="folder holding piqa/tests.jsonl, the GPTQ/AWQ "
                   "calibration text (default $FASQ_DATA_DIR or ../shared/data)")
    b.add_argument("--calib-samples", type=int, default=128)
    b.add_argument("--calib-seqlen", type=int, default=512)
    b.add_argument("--overwrite", action="store_true")
    b.add_argument("--json", action="store_true")

    s = sub.add_parser("bench", help="prefill and decode tokens/s of a model or checkpoint, against its "
                       "uncompressed source in the same harness")
    s.add_argument("model", help="a fasq checkpoint, 'default', a HF folder, a .gguf file or a Hub id")
    s.add_argument("--compare", default=None, help="also time this model (default for a fasq checkpoint: the "
                   "model it was quantized from; 'none' to time only MODEL)")
    s.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    s.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default 128)")
    s.add_argument("--new-tokens", type=int, default=64, help="decode steps timed (default 64)")
    s.add_argument("--compile", choices=["on", "off"], default="on", help="torch.compile the decode step, for "
                   "both models alike (on a GPU with CUDA graphs; default on)")
    s.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    _add_model_opts(s)

    x = sub.add_parser("export", help="save an unquantized model (e.g. the GGUF default) as a plain HF "
                       "folder, for serving engines such as vLLM")
    x.add_argument("model", help="'default', a HF folder, a .gguf file or a Hub id")
    x.add_argument("--out", required=True, help="output folder")
    x.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="dtype of the saved weights (default %(default)s)")
    x.add_argument("--overwrite", action="store_true")

    g = sub.add_parser("generate", help="greedy generation from a prompt")
    g.add_argument("model")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=32)
    _add_model_opts(g)
    return ap
