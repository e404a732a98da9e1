"""`fasq eval`, `info`, `baseline`, `bench`, `export` and `generate`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core.format import format_size_table
from ..eval import speed
from ..eval.baselines import quantize_baseline, save_baseline
from ..eval.data import default_data_dir, wikitext2_test
from ..eval.perplexity import perplexity, tokenize_text
from ..eval.zeroshot import evaluate_tasks
from ..io.dense import export_dense
from ..io.manifest import check_checkpoint, CheckpointError, is_checkpoint, REPORT_NAME
from ..io.outdir import check_output_dir
from ..io.sources import load_model
from .common import DTYPES, check_device, check_source, report_summary, torch_dtype


def _evaluate(model_arg: str, a) -> dict:
    """Perplexity (when asked, or when no tasks are) and zero-shot tasks of one model."""
    model, tok = load_model(model_arg, dtype=torch_dtype(a.dtype), device=a.device)
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
    check_device(a.device)
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
                          "verification": check.status, **report_summary(report), "layers": report["layers"]}))
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
    inputs = check_source(a.model)
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

    model, tok = load_model(source, dtype=torch_dtype(a.dtype), device=a.device)
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
    check_device(a.device)
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
    check_device(a.device)
    if a.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
    model, tok = load_model(a.model, dtype=torch_dtype(a.dtype), device=a.device)
    ids = tok(a.prompt, return_tensors="pt").input_ids.to(a.device)
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty (it has no tokens); give some text to continue")
    out = model.generate(ids, max_new_tokens=a.max_new_tokens, do_sample=False)
    print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return 0
