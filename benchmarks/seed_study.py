"""Seed study: WikiText-2 perplexity of quantization configs across k-means seeds.

    python benchmarks/seed_study.py [--configs NAME ...] [--seeds 0,1,2,3,4] [--windows 10]

For every (config, seed) the default model is loaded, quantized in memory with
`fasq.quantize_model` (the tensors `fasq quantize default OPTIONS --seed S` writes: the
streaming and in-memory paths are byte-identical) and evaluated on the first `--windows`
windows of 2048 tokens of WikiText-2 test (`fasq eval CK --ppl --windows 10`). Results are
merged into benchmarks/results/seeds-study-smollm2.json by (config, seed), with each
config's CLI options, bits per weight, mean, spread (max - min) and the seeds measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "seeds-study-smollm2.json"

# name -> (`fasq quantize default` options, QuantConfig keyword arguments, PQConfig keyword arguments)
CONFIGS = {
    "default, no importance": (["--importance", "none"], {"importance": "none"}, {}),
    "default, importance random-tokens": (["--importance", "random-tokens"], {"importance": "random-tokens"}, {}),
    "default, importance norm": (["--importance", "norm"], {"importance": "norm"}, {}),
}


def build(name: str, seed: int):
    from fasq.core.config import PQConfig, QuantConfig

    _, qkw, lkw = CONFIGS[name]
    return QuantConfig(layer=PQConfig(seed=seed, **lkw), **qkw)


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
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), help="names (substrings) from CONFIGS")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--windows", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results file (default %(default)s)")
    a = ap.parse_args()
    results = a.out
    if a.threads:
        torch.set_num_threads(a.threads)
    from fasq.eval.data import wikitext2_test
    from fasq.stream.memory import quantize_model
    from fasq.eval.perplexity import perplexity, tokenize_text
    from fasq.io.sources import load_model

    names = [n for n in CONFIGS if any(s in n for s in a.configs)]
    seeds = [int(s) for s in a.seeds.split(",")]
    model, tok = load_model("default")
    ids = tokenize_text(tok, wikitext2_test())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    data = json.loads(results.read_text()) if results.exists() else {}
    rows = {(r["config"], r["seed"]): r for r in data.get("rows", [])}
    for name in names:
        for seed in seeds:
            m, _ = load_model("default")
            m.load_state_dict(state)
            rep = quantize_model(m, build(name, seed), progress=False)
            ppl = perplexity(m, ids, 2048, a.windows, progress=False)
            rows[(name, seed)] = {"config": name, "seed": seed, "perplexity": ppl["perplexity"],
                                  "bits_per_weight": rep["size"]["bits_per_weight"],
                                  "size_fraction_of_fp16": rep["size"]["size_fraction_of_fp16"],
                                  "quantize_seconds": rep["seconds"], "windows": ppl["windows"]}
            print(json.dumps(rows[(name, seed)]), flush=True)
            del m
            payload = {
                "what": "WikiText-2 perplexity of the default model against the k-means seed, per config",
                "protocol": f"WikiText-2 test, first {a.windows} windows of 2048 tokens",
                "command": "python benchmarks/seed_study.py " + " ".join(
                    ["--configs", *[repr(n) for n in names], "--seeds", a.seeds, "--windows", str(a.windows)]
                    + ([] if a.out == RESULTS else ["--out", str(a.out)])),
                "cli": {n: "fasq quantize default " + " ".join(CONFIGS[n][0]) + " --seed S --out CK; "
                        f"fasq eval CK --ppl --windows {a.windows}" for n in CONFIGS},
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
