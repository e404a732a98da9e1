"""Target-size solver on the default model (SmolLM2-135M): predicted vs actual size.

    .venv/bin/python benchmarks/solver_demo.py [--sizes 0.30 0.35 0.40 0.45 0.50] [--table t.pkl]

Measures the proxy table once (timed), solves each `--target-size`, then quantizes a copy
of the model with the returned QuantConfig through `fasq.io.checkpoint.quantize_model` and reads
`format.size_table`. For speed the size check runs k-means with 0 Lloyd iterations and
random init (same d, K, scope, scale: the stored size depends only on those and the
shapes); pass --full-kmeans to quantize with the real settings. One CPU thread.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import pickle
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=float, nargs="+", default=[0.30, 0.35, 0.40, 0.45, 0.50])
    ap.add_argument("--table", default=None, help="cache the proxy table in this pickle")
    ap.add_argument("--full-kmeans", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)

    from fasq.stream.memory import quantize_model
    from fasq.quant.solver import achievable_range
    from fasq.stream.solve import measure_model as measure, solve
    from fasq.io.sources import load_model

    model, _ = load_model("default")
    if a.table and os.path.exists(a.table):
        table = pickle.load(open(a.table, "rb"))
    else:
        table = measure(model, progress=True)
        if a.table:
            pickle.dump(table, open(a.table, "wb"))
    print(f"proxy table: {len(table.layers)} layers x {len(table.candidates)} candidates, "
          f"{table.seconds:.0f} s (1 thread)")
    rng = achievable_range(table)["size_fraction_of_fp16"]
    print(f"achievable: {100 * rng[0]:.2f}% .. {100 * rng[1]:.2f}% of FP16")
    print(f"{'target':>8} {'predicted':>10} {'actual':>10} {'bits/w':>7} {'within':>7}  mix")
    for f in a.sizes:
        qcfg, rep = solve(model, target_size=f, table=table)
        if not a.full_kmeans:
            fast = {n: dataclasses.replace(c, kmeans_iters=0, kmeans_init="random")
                    for n, c in qcfg.overrides.items()}
            qcfg = dataclasses.replace(qcfg, overrides=fast)
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        st = quantize_model(m, qcfg, progress=False)["size"]
        del m
        pred, act = rep.predicted["size_fraction_of_fp16"], st["size_fraction_of_fp16"]
        assert st["total_bytes"] == rep.predicted["total_bytes"], (st, rep.predicted)
        ok = 0.99 * f <= act <= f
        counts = {}
        for r in rep.layers:
            counts[r["label"]] = counts.get(r["label"], 0) + 1
        mix = " ".join(f"{k}:{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        print(f"{100 * f:7.2f}% {100 * pred:9.3f}% {100 * act:9.3f}% {st['bits_per_weight']:7.3f} "
              f"{'yes' if ok else 'NO':>7}  {mix}  (solve {rep.solve_seconds:.1f}s, "
              f"quantize {time.perf_counter() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
