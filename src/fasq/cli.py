"""The `fasq` command line: quantize, eval, info, baseline, bench, export, generate."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

from .core.config import ConfigError, DEFAULT_SKIP, IMPORTANCE, PQConfig, QuantConfig, RTNConfig
from .core.convert import quantizable_linears
from .core.format import format_size_table
from .eval import speed
from .eval.baselines import BaselineError, quantize_baseline, save_baseline
from .eval.data import default_data_dir, wikitext2_test
from .eval.perplexity import perplexity, tokenize_text
from .eval.zeroshot import evaluate_tasks
from .io.checkpoint import save_quantized
from .io.dense import export_dense
from .io.manifest import check_checkpoint, CheckpointError, is_checkpoint, REPORT_NAME
from .io.outdir import check_output_dir
from .io.sources import load_model, local_paths, ModelSourceError, resolve
from .quant.solver import DEFAULT_CANDIDATES, DEFAULT_PROXY, IMPORTANCE as PROXIES, parse_candidates
from .quant.tensor_parallel import fit_config, group_options
from .stream import make_plan, quantize_streaming
from .stream.memory import quantize_model
from .stream.pipeline import work_dir
from .stream.readers import StreamingUnsupported
from .stream.solve import solve, solve_streaming


DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


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
                   "(default: embed_tokens lm_head)")
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


def _layer_config(a):
    if a.method == "rtn":
        return RTNConfig(bits=a.bits, group_size=a.group_size)
    return PQConfig(d=a.subvector_dim, K=a.codebook_size, codebook_scope=a.scope,
                    codebook_group=a.codebook_group, scale=a.scale,
                    scale_group=a.scale_group, kmeans_iters=a.kmeans_iters, kmeans_init=a.kmeans_init,
                    kmeans_sample=a.kmeans_sample, seed=a.seed)


def _check_device(name: str) -> None:
    """A clear refusal of a device this torch cannot use, before any work."""
    import torch

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


def _check_source(model: str) -> list:
    """The local paths a quantize/export/baseline reads; refuses a fasq checkpoint as input."""
    if is_checkpoint(resolve(model)[0]):
        raise ValueError(f"{model} is already a fasq checkpoint; quantize the model it was made from "
                         f"(`fasq info {model}` names it)")
    return local_paths(model)


def _warn_unmatched_skips(patterns, module_names) -> None:
    """--skip patterns that match no module: most likely a typo (`lm_heed`), which would
    quantize the layer the user meant to keep."""
    for pat in patterns:
        if pat not in DEFAULT_SKIP and not any(QuantConfig(skip=(pat,)).is_skipped(n) for n in module_names):
            print(f"fasq quantize: warning: --skip {pat!r} matches no module of the model, so it skips "
                  "nothing (module names look like model.layers.0.mlp.down_proj)", file=sys.stderr)


def cmd_quantize(a) -> int:
    _check_device(a.device)
    inputs = _check_source(a.model)
    out = check_output_dir(a.out, a.overwrite, inputs)  # fail before the slow part
    a.inputs = inputs
    skip = tuple(a.skip) if a.skip is not None else DEFAULT_SKIP
    targets = (a.target_bits is not None) + (a.target_size is not None)
    if targets > 1 or (targets and a.method == "rtn"):
        raise ValueError("give at most one of --target-bits / --target-size, and not with --method rtn")
    if a.candidates is not None and not targets:
        raise ValueError("--candidates only applies with --target-bits or --target-size")
    if a.proxy is not None and not targets:
        raise ValueError("--proxy only applies with --target-bits or --target-size")
    if a.tensor_parallel < 1:
        raise ValueError(f"--tensor-parallel must be >= 1, got {a.tensor_parallel}")
    cands = None if a.candidates is None else parse_candidates(a.candidates)  # fail before the slow part
    qcfg = QuantConfig(layer=_layer_config(a), skip=skip, importance=a.importance)
    t0 = time.perf_counter()
    run = _quantize_in_memory if a.in_memory else _quantize_streaming
    report = run(a, out, qcfg, cands, bool(targets))
    report["total_seconds"] = time.perf_counter() - t0
    if a.json:
        print(json.dumps({"out": str(out), "total_seconds": report["total_seconds"], **_summary(report),
                          **({"streaming": report["streaming"]} if "streaming" in report else {})}))
    else:
        resumed = report.get("streaming", {}).get("resumed_shards")
        earlier = " over this and earlier runs" if resumed else ""
        print(f"saved {out}  (quantization {report['seconds']:.1f}s{earlier}, this run "
              f"{report['total_seconds']:.1f}s)")
        print(format_size_table(report["size"]))
    return 0


def _quantize_streaming(a, out, qcfg, cands, targets: bool) -> dict:
    """Tensor by tensor from the files (the default); resumes an interrupted run."""
    try:
        plan = make_plan(a.model, qcfg, dtype=_dtype(a.dtype))
    except StreamingUnsupported as e:
        print(f"fasq quantize: {e}; loading the whole model instead", file=sys.stderr)
        return _quantize_in_memory(a, out, qcfg, cands, targets)
    if a.skip:
        _warn_unmatched_skips(a.skip, {n.rsplit(".", 1)[0] for n in plan.names})
    if a.tensor_parallel > 1:
        plan.qcfg, cands = _fit_tensor_parallel(plan.qcfg, cands, list(plan.shapes().values()), a)
    extra = None
    if targets:
        plan.qcfg, solved = solve_streaming(plan, target_bits=a.target_bits, target_size=a.target_size,
                                            candidates=cands, progress=not a.json, device=a.device,
                                            importance=a.proxy or DEFAULT_PROXY,
                                            load_whole=lambda: load_model(a.model, dtype=plan.dtype)[0])
        if not a.json:
            print(solved.format())
        extra = {"solver": solved.to_dict()}
    try:
        return quantize_streaming(a.model, out, plan.qcfg, device=a.device, overwrite=a.overwrite,
                                  progress=not a.json, plan=plan, extra_report=extra)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; the shards finished so far are kept in {work_dir(out)}: run the "
                          "same command again to resume") from None


def _quantize_in_memory(a, out, qcfg, cands, targets: bool) -> dict:
    """The whole model loaded (`--in-memory`): the Python API's path."""
    model, tok = load_model(a.model, dtype=_dtype(a.dtype), device=a.device)
    if a.skip:
        _warn_unmatched_skips(a.skip, {n for n, _ in model.named_modules()})
    if a.tensor_parallel > 1:
        shapes = [(lin.out_features, lin.in_features) for _, lin in quantizable_linears(model, qcfg)]
        qcfg, cands = _fit_tensor_parallel(qcfg, cands, shapes, a)
    solved = None
    if targets:
        qcfg, solved = solve(model, target_bits=a.target_bits, target_size=a.target_size, skip=qcfg.skip,
                             candidates=cands, progress=not a.json, device=a.device, base=qcfg,
                             importance=a.proxy or DEFAULT_PROXY)
        if not a.json:
            print(solved.format())
    report = quantize_model(model, qcfg, device=a.device, progress=not a.json)
    if solved is not None:
        report["solver"] = solved.to_dict()
    report["source"] = a.model
    save_quantized(model, out, tokenizer=tok, report=report, overwrite=a.overwrite, inputs=a.inputs)
    return report


def _fit_tensor_parallel(qcfg, cands, shapes, a):
    """The config (and solver candidates) with groups that split at --tensor-parallel ranks."""
    tp = a.tensor_parallel
    layer = fit_config(qcfg.layer, shapes, tp)
    if layer != qcfg.layer and not a.json:
        print(f"fasq quantize: --tensor-parallel {tp}: using {group_options(layer)} (asked: "
              f"{group_options(qcfg.layer)}) so that every layer splits evenly", file=sys.stderr)
    fitted = None
    if a.target_bits is not None or a.target_size is not None:
        fitted = []
        for c in cands or DEFAULT_CANDIDATES:
            try:
                fitted.append(fit_config(c, shapes, tp))
            except ConfigError as e:
                print(f"fasq quantize: candidate d{c.d}K{c.K} left out: {e}", file=sys.stderr)
    return dataclasses.replace(qcfg, layer=layer), fitted


def _summary(report: dict) -> dict:
    layers = report["layers"]
    finite = [r["sqnr_db"] for r in layers if math.isfinite(r["sqnr_db"])]
    return {**report["size"], "seconds": report["seconds"], "importance_seconds": report.get("importance_seconds", 0.0),
            "mean_rel_error": sum(r["rel_error"] for r in layers) / len(layers),
            # lossless layers have infinite SQNR: the mean is over the lossy ones (None if none)
            "mean_sqnr_db": (sum(finite) / len(finite)) if finite else None}


def _evaluate(model_arg: str, a) -> dict:
    """Perplexity (when asked, or when no tasks are) and zero-shot tasks of one model."""
    model, tok = load_model(model_arg, dtype=_dtype(a.dtype), device=a.device)
    res = {"model": model_arg}
    if a.ppl or not a.tasks:
        ids = tokenize_text(tok, wikitext2_test(a.data_dir))
        res.update(perplexity(model, ids, seqlen=a.seqlen, windows=a.windows or None, progress=not a.json))
    if a.tasks:
        res["tasks"] = evaluate_tasks(model, tok, [t for t in a.tasks.split(",") if t],
                                      data_dir=a.data_dir or default_data_dir(), limit=a.limit,
                                      batch_size=a.batch_size)
    return res


def _print_eval(res: dict) -> None:
    if "perplexity" in res:
        print(f"{res['model']}: WikiText-2 perplexity {res['perplexity']:.3f} "
              f"({res['windows']} windows x {res['seqlen']} tokens)")
    for task, r in res.get("tasks", {}).items():
        norm = "" if r.get("acc_norm") is None else f"  acc_norm {r['acc_norm']:.4f}"
        print(f"{res['model']}: {task:<16} acc {r['acc']:.4f}{norm}  (n={r['n']})")


def cmd_eval(a) -> int:
    _check_device(a.device)
    if a.windows < 0:
        raise ValueError(f"--windows must be >= 0 (0 = the whole text), got {a.windows}")
    if a.seqlen < 2:
        raise ValueError(f"--seqlen must be >= 2 tokens, got {a.seqlen}")
    for name in ("limit", "batch_size"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    res = _evaluate(a.model, a)
    if a.compare:
        ref = _evaluate(a.compare, a)
        res["reference"] = ref
        if "perplexity" in res:
            res["ratio_to_reference"] = res["perplexity"] / ref["perplexity"]
    if a.json:
        print(json.dumps(res))
        return 0
    _print_eval(res)
    if a.compare:
        _print_eval(res["reference"])
        if "ratio_to_reference" in res:
            print(f"perplexity ratio to reference: {res['ratio_to_reference']:.3f}")
    return 0


def cmd_info(a) -> int:
    check = check_checkpoint(a.checkpoint)
    qdict = check.qdict
    rpath = Path(a.checkpoint) / REPORT_NAME
    if not rpath.is_file():
        raise CheckpointError(f"{a.checkpoint} has no {REPORT_NAME} (it is written by `fasq quantize`; "
                              "a checkpoint saved by transformers' save_pretrained has none)")
    report = json.loads(rpath.read_text())
    if a.json:
        print(json.dumps({"quantization_config": qdict, "verified": check.manifest and check.config_covered,
                          "verification": check.status, **_summary(report), "layers": report["layers"]}))
        return 0
    print(f"checkpoint {a.checkpoint} (format version {qdict['format_version']}, source {report.get('source')})")
    print(check.status)
    print("layer config: " + ", ".join(f"{k}={v}" for k, v in qdict["layer"].items()))
    print(f"skipped: {', '.join(qdict['skip'])}; overrides: {len(qdict['overrides'])}")
    print(format_size_table(report["size"]))
    print(f"\n  {'layer':<44}{'out x in':>12}{'bits/w':>8}{'rel err':>9}{'SQNR dB':>9}")
    for r in report["layers"]:
        print(f"  {r['name']:<44}{r['out']:>6}x{r['in']:<5}{r['bits_per_weight']:>8.3f}"
              f"{r['rel_error']:>9.4f}{r['sqnr_db']:>9.2f}")
    return 0


def cmd_baseline(a) -> int:
    inputs = _check_source(a.model)
    check_output_dir(a.out, a.overwrite, inputs)  # fail before the slow part
    model, tok, info = quantize_baseline(a.model, a.method, a.bits, a.group_size, data_dir=a.data_dir,
                                         calib_samples=a.calib_samples, calib_seqlen=a.calib_seqlen)
    out = save_baseline(model, tok, info, a.out, overwrite=a.overwrite, inputs=inputs)
    if a.json:
        print(json.dumps({"out": str(out), **info}))
    else:
        print(f"saved {out}: {info['method']} {info['bits']}-bit g{info['group_size']}, "
              f"{info['bits_per_weight']:.3f} bits/weight, {100 * info['size_fraction_of_fp16']:.1f} % of FP16 "
              f"({info['seconds']:.0f} s, {info['library']})")
    return 0


def _bench_one(source: str, a) -> dict:
    import gc

    import torch

    model, tok = load_model(source, dtype=_dtype(a.dtype), device=a.device)
    ids = tok("The capital of France is", return_tensors="pt").input_ids[0]
    res = speed.measure(model, ids, batch=a.batch, prompt_len=a.prompt_len, new_tokens=a.new_tokens,
                        compile=a.compile == "on")
    row = {"model": source, "dtype": a.dtype, "device": a.device, "weight_bytes": speed.weight_bytes(model),
           **res.as_dict()}
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def cmd_bench(a) -> int:
    import torch

    _check_device(a.device)
    for name in ("batch", "prompt_len", "new_tokens"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    compare = a.compare
    if compare is None and is_checkpoint(a.model):
        report = Path(a.model) / REPORT_NAME
        compare = json.loads(report.read_text()).get("source") if report.is_file() else None
    rows = [_bench_one(a.model, a)]
    if compare and compare != "none":
        rows.append(_bench_one(compare, a))
        for r in rows:
            r["decode_speedup"] = r["decode_tok_s"] / rows[-1]["decode_tok_s"]
            r["prefill_speedup"] = r["prefill_tok_s"] / rows[-1]["prefill_tok_s"]
    result = {"threads": torch.get_num_threads(), "rows": rows}
    if a.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{a.device}, {a.dtype}, {torch.get_num_threads()} threads, batch {a.batch}, prompt {a.prompt_len}, "
          f"{a.new_tokens} new tokens, compile {a.compile}")
    print(f"{'model':<40} {'weights MB':>10} {'prefill tok/s':>14} {'decode tok/s':>13} {'decode x':>9}")
    for r in rows:
        ratio = f"{r['decode_speedup']:.2f}" if "decode_speedup" in r else "-"
        print(f"{r['model']:<40} {r['weight_bytes'] / 1e6:>10.1f} {r['prefill_tok_s']:>14.1f} "
              f"{r['decode_tok_s']:>13.2f} {ratio:>9}")
    return 0


def cmd_export(a) -> int:
    dtype = DTYPES[a.dtype]
    out = export_dense(a.model, a.out, dtype=dtype, overwrite=a.overwrite)
    print(f"saved {out} ({dtype}, unquantized)")
    return 0


def cmd_generate(a) -> int:
    _check_device(a.device)
    if a.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
    model, tok = load_model(a.model, dtype=_dtype(a.dtype), device=a.device)
    ids = tok(a.prompt, return_tensors="pt").input_ids.to(a.device)
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty (it has no tokens); give some text to continue")
    out = model.generate(ids, max_new_tokens=a.max_new_tokens, do_sample=False)
    print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return 0


class Interrupted(Exception):
    """Ctrl-C, with what it left behind and how to carry on."""


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)

    try:
        return {"quantize": cmd_quantize, "eval": cmd_eval, "info": cmd_info, "generate": cmd_generate,
                "baseline": cmd_baseline, "bench": cmd_bench,
                "export": cmd_export}[a.cmd](a)
    except (BaselineError, ConfigError, CheckpointError, ModelSourceError, FileExistsError, FileNotFoundError,
            ValueError) as e:
        # TaskDataError (missing zero-shot files) is a FileNotFoundError
        print(f"fasq {a.cmd}: error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Interrupted) as e:
        # outputs are written to temporary folders renamed at the end: nothing half-written is left
        writes = a.cmd in ("quantize", "export", "baseline")
        print(f"fasq {a.cmd}: {e or ('interrupted; nothing was written' if writes else 'interrupted')}",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
