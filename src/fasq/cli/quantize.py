"""`fasq quantize`: streamed (default) or in memory, with the solver and tensor-parallel fits."""

from __future__ import annotations

import dataclasses
import json
import sys
import time

from ..core.config import ConfigError, DEFAULT_SKIP, PQConfig, QuantConfig, RTNConfig
from ..core.convert import quantizable_linears
from ..core.format import format_size_table
from ..io.checkpoint import save_quantized
from ..io.outdir import check_output_dir
from ..io.sources import load_model
from ..quant.solver import DEFAULT_CANDIDATES, DEFAULT_PROXY, parse_candidates
from ..quant.tensor_parallel import fit_config, group_options
from ..stream import make_plan, quantize_streaming
from ..stream.memory import quantize_model
from ..stream.pipeline import work_dir
from ..stream.readers import StreamingUnsupported
from ..stream.solve import solve, solve_streaming
from .common import Interrupted, check_device, check_source, report_summary, torch_dtype


def _layer_config(a):
    if a.method == "rtn":
        return RTNConfig(bits=a.bits, group_size=a.group_size)
    return PQConfig(d=a.subvector_dim, K=a.codebook_size, codebook_scope=a.scope,
                    codebook_group=a.codebook_group, scale=a.scale,
                    scale_group=a.scale_group, kmeans_iters=a.kmeans_iters, kmeans_init=a.kmeans_init,
                    kmeans_sample=a.kmeans_sample, seed=a.seed)


# --lm-head: what the output head becomes ("dense": skipped, as by default)
HEAD_CONFIGS = {"rtn8": RTNConfig(bits=8, group_size=64)}


def _head(a, skip: tuple[str, ...], targets: bool) -> tuple[tuple[str, ...], dict]:
    """(skip, overrides) for --lm-head: the head quantized (a tied one is untied) with the
    layers' config ("same") or RTN 8-bit ("rtn8", the int8 CPU path's exact grid)."""
    if a.lm_head == "dense":
        return skip, {}
    if a.skip is not None and QuantConfig(skip=tuple(a.skip)).is_skipped("lm_head"):
        raise ValueError(f"--lm-head {a.lm_head} quantizes lm_head, but --skip also names it; drop one")
    if a.tensor_parallel > 1:
        raise ValueError("--lm-head with --tensor-parallel: the vLLM plugin does not serve a quantized head yet")
    if a.lm_head == "rtn8" and targets:
        raise ValueError("--lm-head rtn8 with --target-bits / --target-size: the solver would choose the "
                         "head's config too; use --lm-head same to let it, or leave the head dense")
    skip = tuple(s for s in skip if not QuantConfig(skip=(s,)).is_skipped("lm_head"))
    return skip, ({"lm_head": HEAD_CONFIGS[a.lm_head]} if a.lm_head in HEAD_CONFIGS else {})


def _warn_unmatched_skips(patterns, module_names) -> None:
    """--skip patterns that match no module: most likely a typo (`lm_heed`), which would
    quantize the layer the user meant to keep."""
    for pat in patterns:
        if pat not in DEFAULT_SKIP and not any(QuantConfig(skip=(pat,)).is_skipped(n) for n in module_names):
            print(f"fasq quantize: warning: --skip {pat!r} matches no module of the model, so it skips "
                  "nothing (module names look like model.layers.0.mlp.down_proj)", file=sys.stderr)


def cmd_quantize(a) -> int:
    check_device(a.device)
    inputs = check_source(a.model)
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
    skip, overrides = _head(a, skip, bool(targets))
    qcfg = QuantConfig(layer=_layer_config(a), skip=skip, overrides=overrides, importance=a.importance)
    t0 = time.perf_counter()
    run = _quantize_in_memory if a.in_memory else _quantize_streaming
    report = run(a, out, qcfg, cands, bool(targets))
    report["total_seconds"] = time.perf_counter() - t0
    if a.json:
        print(json.dumps({"out": str(out), "total_seconds": report["total_seconds"], **report_summary(report),
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
        plan = make_plan(a.model, qcfg, dtype=torch_dtype(a.dtype))
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
    model, tok = load_model(a.model, dtype=torch_dtype(a.dtype), device=a.device)
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
