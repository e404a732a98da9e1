"""Issue-2 results table: quantize the default model with each config through the CLI,
then WikiText-2 perplexity (first 10 windows of 2048 tokens) and `fasq info --json`.

    python benchmarks/ppl_table.py [--windows 10] [--only NAME ...]

Every row is exactly the `fasq` command lines it prints; results go to
benchmarks/results/ppl-smollm2.json (rows are merged by name, so a partial rerun keeps
the others) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "ppl-smollm2.json"
CK = "runs/ppl-table/ck"

# name -> quantize options (None: the unquantized reference)
ROWS = {
    "reference (FP32 from Q4_1 GGUF)": None,
    "FASQ d=2, K=256, codebook per 96 subspaces, scale per 96 cols (default)": [],
    "FASQ d=2, K=256, one codebook, scale per 96 cols": ["-d", "2", "-K", "256", "--scope", "matrix"],
    "FASQ d=2, K=256, one codebook, per-row scales": ["-d", "2", "-K", "256", "--scope", "matrix",
                                                       "--scale-group", "0"],
    "FASQ solver, per-layer (d, K), --target-size 0.419 (the default's size)": ["--target-size", "0.419"],
    "FASQ d=2, K=512, one codebook, scale per 96 cols": ["-d", "2", "-K", "512", "--scope", "matrix"],
    "FASQ solver, per-layer (d, K), --target-size 0.392 (d=2 K=128's size)": ["--target-size", "0.392"],
    "FASQ d=2, K=128, one codebook, scale per 96 cols": ["-d", "2", "-K", "128", "--scope", "matrix"],
    "FASQ d=3, K=512, one codebook, scale per 96 cols": ["-d", "3", "-K", "512", "--scope", "matrix"],
    "FASQ d=2, K=64, one codebook, scale per 96 cols": ["-d", "2", "-K", "64", "--scope", "matrix"],
    "RTN 4-bit g64": ["--method", "rtn", "--bits", "4", "--group-size", "64"],
    "RTN 4-bit g32 (lossless on Q4_1 origin)": ["--method", "rtn", "--bits", "4", "--group-size", "32"],
    "RTN 3-bit g64": ["--method", "rtn", "--bits", "3", "--group-size", "64"],
    "RTN 3-bit g32": ["--method", "rtn", "--bits", "3", "--group-size", "32"],
}


def run(args: list[str], python: str = sys.executable) -> dict:
    """`fasq ARGS --json` with this (or another environment's) python; its last output line."""
    print("$ fasq " + shlex.join(args), flush=True)
    out = subprocess.run([python, "-m", "fasq.cli", *args, "--json"], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(name: str, opts: list[str] | None, windows: int, ck: str) -> dict:
    ev = ["eval", "default", "--ppl", "--windows", str(windows)]
    if opts is None:
        return {"name": name, "commands": ["fasq " + shlex.join(ev)], "perplexity": run(ev)["perplexity"],
                "bits_per_weight": 16.0, "size_fraction_of_fp16": 1.0}
    q = ["quantize", "default", *opts, "--out", ck, "--overwrite"]
    qres = run(q)
    info = run(["info", ck])
    ev[1] = ck
    ppl = run(ev)
    return {"name": name, "commands": ["fasq " + shlex.join(q), "fasq " + shlex.join(ev)],
            "perplexity": ppl["perplexity"], "windows": ppl["windows"], "tokens": ppl["tokens"],
            "bits_per_weight": info["bits_per_weight"], "size_fraction_of_fp16": info["size_fraction_of_fp16"],
            "quantize_seconds": qres["seconds"], "total_seconds": qres.get("total_seconds"),
            "mean_sqnr_db": info["mean_sqnr_db"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=10)
    ap.add_argument("--only", nargs="*", help="row names (substrings) to (re)run")
    a = ap.parse_args()
    rows = json.loads(RESULTS.read_text())["rows"] if RESULTS.exists() else []
    done = {r["name"]: r for r in rows}
    # checkpoints go to runs/ppl-table/ck (git-ignored), replaced row after row
    for name, opts in ROWS.items():
        if a.only and not any(s in name for s in a.only):
            continue
        done[name] = measure(name, opts, a.windows, CK)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        payload = {"model": "SmolLM2-135M-Instruct (default)", "protocol": f"WikiText-2 test, "
                   f"first {a.windows} windows of 2048 tokens", "rows": [done[n] for n in ROWS if n in done]}
        tmpf = RESULTS.with_suffix(".json.tmp")
        tmpf.write_text(json.dumps(payload, indent=1))
        os.replace(tmpf, RESULTS)
        print(json.dumps(done[name]), flush=True)
    print("\n| config | bits/weight | size vs FP16 | perplexity |\n|---|---|---|---|")
    for n in ROWS:
        if n in done:
            r = done[n]
            print(f"| {n} | {r['bits_per_weight']:.3f} | {100 * r['size_fraction_of_fp16']:.1f} % | "
                  f"{r['perplexity']:.2f} |")


if __name__ == "__main__":
    main()
