"""Seed study: WikiText-2 perplexity of quantization configs across k-means seeds.

    python benchmarks/seed_study.py [--configs NAME ...] [--seeds 0,1,2,3,4] [--windows 10]

For every (config, seed) the default model is loaded, quantized in memory with
`fasq.quantize_model` (the tensors `fasq quantize default OPTIONS --seed S` writes: the
streaming and in-memory paths are byte-identical) and evaluated on the first `--windows`
windows of 2048 tokens of WikiText-2 test (`fasq eval CK --ppl --windows 10`). Results are
merged into benchmarks/results/seeds-study-smollm2.json by (config, seed), with each
config's CLI options, bits per weight, mean, spread (max - min) and the seeds measured.

Solver configs ("solver ..." in CONFIGS: `fasq quantize default --target-bits B` or
`--target-size F`, with `--proxy P`) run the solver on the unquantized model first
(`fasq.stream.solve.solve`, the config's seed carried to every chosen layer); the proxy
table does not depend on the seed, so it is measured once per (candidates, proxy kind) and
reused. Their rows go to seeds-study-solver-smollm2.json with
`--out benchmarks/results/seeds-study-solver-smollm2.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "seeds-study-smollm2.json"

# the candidate set the README uses near 3 bits (the default set plus d=3)
D3_CANDIDATES = "d4K64,d4K256,d4K1024,d3K256,d3K512,d3K1024,d2K32,d2K64,d2K128,d2K256,d2K512,d1K16,d1K32,d1K64"

# name -> (`fasq quantize default` options, QuantConfig keyword arguments, PQConfig keyword arguments,
#          solver keyword arguments or None)
CONFIGS = {
    "default, no importance": (["--importance", "none"], {"importance": "none"}, {}, None),
    "default, importance random-tokens": (["--importance", "random-tokens"], {"importance": "random-tokens"}, {},
                                          None),
    "default, importance norm": (["--importance", "norm"], {"importance": "norm"}, {}, None),
}
# the frontier's uniform FASQ rows (benchmarks/frontier.py: one codebook per matrix, scale per 96 columns)
for _d, _K in ((2, 64), (2, 128), (2, 256), (2, 512), (3, 512)):
    CONFIGS[f"d={_d} K={_K}, one codebook"] = (["-d", str(_d), "-K", str(_K), "--scope", "matrix"], {},
                                               {"d": _d, "K": _K, "codebook_scope": "matrix"}, None)
for _proxy in ("rel", "output", "output-sq"):
    CONFIGS[f"solver 3.1 bits (d3 candidates), proxy {_proxy}"] = (
        ["--target-bits", "3.1", "--candidates", D3_CANDIDATES, "--proxy", _proxy], {}, {},
        {"target_bits": 3.1, "candidates": D3_CANDIDATES, "importance": _proxy})
    CONFIGS[f"solver at the default's size, proxy {_proxy}"] = (
        ["--target-size", "0.4192", "--proxy", _proxy], {}, {},
        {"target_size": 0.4192, "candidates": None, "importance": _proxy})

# the frontier's other FASQ rows (benchmarks/frontier.py and ppl_table.py), with the default proxy
CONFIGS["d=2 K=256, one codebook, per-row scales"] = (
    ["-d", "2", "-K", "256", "--scope", "matrix", "--scale-group", "0"], {},
    {"d": 2, "K": 256, "codebook_scope": "matrix", "scale_group": 0}, None)
for _label, _size in (("GPTQ/AWQ 4-bit g192's size", 0.4132), ("d=2 K=128's size", 0.392),
                      ("GPTQ/AWQ 3-bit g192's size", 0.3636)):
    CONFIGS[f"solver at {_label}, proxy rel"] = (["--target-size", str(_size), "--proxy", "rel"], {}, {},
                                                 {"target_size": _size, "candidates": None, "importance": "rel"})


def build(name: str, seed: int, model=None, tables: dict | None = None):
    """The config of `name` at k-means seed `seed` (solver configs: solved on `model`, the
    proxy table cached in `tables`); returns (QuantConfig, solver report dict or None)."""
    from fasq.core.config import PQConfig, QuantConfig
    from fasq.quant.solver import DEFAULT_CANDIDATES, OUTPUT_PROXIES, parse_candidates
    from fasq.stream.solve import measure_model, solve

    _, qkw, lkw, skw = CONFIGS[name]
    base = QuantConfig(layer=PQConfig(seed=seed, **lkw), **qkw)
    if skw is None:
        return base, None
    weighted = skw["importance"] in OUTPUT_PROXIES
    if weighted not in tables:  # every candidate of every solver config, measured once
        tables[weighted] = measure_model(model, _all_candidates(), progress=False, weighted=weighted, base=base)
    table = subtable(tables[weighted], parse_candidates(skw["candidates"]) if skw["candidates"]
                     else list(DEFAULT_CANDIDATES))
    qcfg, rep = solve(model, target_bits=skw.get("target_bits"), target_size=skw.get("target_size"),
                      importance=skw["importance"], table=table, base=base)
    return qcfg, rep


def _all_candidates():
    from fasq.quant.solver import DEFAULT_CANDIDATES, parse_candidates

    out = {}
    for *_, skw in CONFIGS.values():
        if skw is not None:
            for c in (parse_candidates(skw["candidates"]) if skw["candidates"] else DEFAULT_CANDIDATES):
                out.setdefault(c.label(), c)
    return list(out.values())


def subtable(table, cands):
    """The table restricted to the candidates `cands` (each candidate is measured on its own,
    with its own seed: the same numbers as measuring with `cands` alone)."""
    import copy
    import dataclasses

    index = {c.label(): j for j, c in enumerate(table.candidates)}
    new_j = {index[c.label()]: k for k, c in enumerate(cands)}
    layers = []
    for t in table.layers:
        keep = sorted((i for i, j in enumerate(t.options) if j in new_j), key=lambda i: new_j[t.options[i]])
        layers.append(dataclasses.replace(
            copy.copy(t), options=[new_j[t.options[i]] for i in keep], bytes=[t.bytes[i] for i in keep],
            sq_error=[t.sq_error[i] for i in keep], out_error=[t.out_error[i] for i in keep]))
    return dataclasses.replace(table, candidates=list(cands), layers=layers)


def summarise(rows: list[dict]) -> dict:
    out = {}
    for name in dict.fromkeys(r["config"] for r in rows):
        ppl = [r["perplexity"] for r in rows if r["config"] == name]
        bits = {round(r["bits_per_weight"], 4) for r in rows if r["config"] == name}
        out[name] = {"seeds": [r["seed"] for r in rows if r["config"] == name], "mean": statistics.mean(ppl),
                     "spread": max(ppl) - min(ppl), "max": max(ppl), "min": min(ppl),
                     "bits_per_weight": sorted(bits)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), help="names from CONFIGS (substrings, or regular expressions: 'proxy (rel|output)$')")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--windows", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results file (default %(default)s)")
    ap.add_argument("--seed-major", action="store_true", help="all configs at one seed, then the next seed "
                    "(default: all seeds of one config, then the next config)")
    ap.add_argument("--skip-done", action="store_true", help="leave out (config, seed) rows already in --out")
    a = ap.parse_args()
    results = a.out
    if a.threads:
        torch.set_num_threads(a.threads)
    from fasq.eval.data import wikitext2_test
    from fasq.stream.memory import quantize_model
    from fasq.eval.perplexity import perplexity, tokenize_text
    from fasq.io.sources import load_model

    names = [n for n in CONFIGS if any(re.search(s, n) for s in a.configs)]
    seeds = [int(s) for s in a.seeds.split(",")]
    model, tok = load_model("default")
    ids = tokenize_text(tok, wikitext2_test())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    data = json.loads(results.read_text()) if results.exists() else {}
    rows = {(r["config"], r["seed"]): r for r in data.get("rows", [])}
    command = "python benchmarks/seed_study.py " + " ".join(
        ["--configs", *[repr(n) for n in names], "--seeds", a.seeds, "--windows", str(a.windows)]
        + ([] if a.out == RESULTS else ["--out", str(a.out)]))
    tables: dict = {}
    order = ([(n, s) for s in seeds for n in names] if a.seed_major else [(n, s) for n in names for s in seeds])
    for name, seed in order:
        if a.skip_done and (name, seed) in rows:
            continue
        m, _ = load_model("default")
        m.load_state_dict(state)
        t0 = time.perf_counter()
        qcfg, solved = build(name, seed, m, tables)
        solve_s = time.perf_counter() - t0
        rep = quantize_model(m, qcfg, progress=False)
        ppl = perplexity(m, ids, 2048, a.windows, progress=False)
        rows[(name, seed)] = {"config": name, "seed": seed, "perplexity": ppl["perplexity"],
                              "bits_per_weight": rep["size"]["bits_per_weight"],
                              "size_fraction_of_fp16": rep["size"]["size_fraction_of_fp16"],
                              "quantize_seconds": rep["seconds"], "windows": ppl["windows"]}
        if solved is not None:
            counts: dict[str, int] = {}
            for r in solved.layers:
                counts[r["label"]] = counts.get(r["label"], 0) + 1
            rows[(name, seed)].update({"proxy": solved.importance, "proxy_importance": solved.proxy_importance,
                                       "solver_seconds": solve_s, "layer_configs": counts,
                                       "down_proj_bits": [round(r["bits_per_weight"], 3) for r in solved.layers
                                                          if r["name"].endswith("down_proj")]})
        print(json.dumps(rows[(name, seed)]), flush=True)
        del m
        payload = {
            "what": "WikiText-2 perplexity of the default model against the k-means seed, per config",
            "protocol": f"WikiText-2 test, first {a.windows} windows of 2048 tokens",
            "command": command,
            "commands": list(dict.fromkeys(data.get("commands", [data["command"]] if "command" in data else [])
                                           + [command])),
            "cli": {n: "fasq quantize default " + " ".join(CONFIGS[n][0]) + " --seed S --out CK; "
                    f"fasq eval CK --ppl --windows {a.windows}"
                    for n in CONFIGS if n in {r["config"] for r in rows.values()}},
            "rows": sorted(rows.values(), key=lambda r: (list(CONFIGS).index(r["config"])
                                                         if r["config"] in CONFIGS else 99, r["seed"])),
        }
        payload["summary"] = summarise(payload["rows"])
        results.parent.mkdir(parents=True, exist_ok=True)
        tmp = results.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        os.replace(tmp, results)
    for name, s in summarise(list(rows.values())).items():
        print(f"{name}: mean {s['mean']:.2f}, spread {s['spread']:.2f} over seeds {s['seeds']}, "
              f"bits/weight {s['bits_per_weight']}")


if __name__ == "__main__":
    main()
