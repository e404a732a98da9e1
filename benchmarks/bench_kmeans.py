"""Where fasq's quantization time goes, per step, for one decoder layer's shapes.

    python benchmarks/bench_kmeans.py                      # default model shapes, CPU
    python benchmarks/bench_kmeans.py --shapes llama3-8b --device cuda

Quantizes random weights of one decoder layer (timing does not depend on the values) with
the default config and reports seconds in each step of `quantize.quantize_pq`: scale
normalisation, k-means++ seeding, the assignments (Lloyd's and the final one over all
sub-vectors), the centroid updates, the least-squares scale refit, and the rest (copies,
reshapes, host-device transfers). `--backends torch,library` compares the k-means
backends on the CPU. Writes benchmarks/results/kmeans-<device>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

from fasq.quant import kmeans as km
from fasq.quant import quantize as Q
from fasq.core.config import PQConfig

SHAPES = {  # (out, in) of the 7 linear layers of one decoder layer
    "smollm2-135m": [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)],
    "llama3-8b": [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096),
                  (4096, 14336)],
}
STEPS = ("normalise", "seeding", "assign", "update", "refit")


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def timed_steps(device, totals: dict, backend: str):
    """Wrap the quantizer's steps with timers (synchronised on a GPU)."""
    originals = {"_normalise": Q._normalise, "init_kmeanspp": km.init_kmeanspp, "assign": km.assign,
                 "_update": km._update, "_refit_scales": Q._refit_scales}

    def wrap(step, fn):
        def run(*a, **k):
            _sync(device)
            t0 = time.perf_counter()
            r = fn(*a, **k)
            _sync(device)
            totals[step] += time.perf_counter() - t0
            return r
        return run

    km.init_kmeanspp = wrap("seeding", lambda p, K, g, b="auto": originals["init_kmeanspp"](p, K, g, backend))
    km.assign = wrap("assign", lambda p, c, return_dist=False, **kw:
                     originals["assign"](p, c, return_dist, backend=backend))
    km._update = wrap("update", originals["_update"])
    Q._normalise = wrap("normalise", originals["_normalise"])
    Q._refit_scales = wrap("refit", originals["_refit_scales"])
    Q.assign = km.assign
    try:
        yield
    finally:
        km.init_kmeanspp, km.assign, km._update = (originals["init_kmeanspp"], originals["assign"],
                                                   originals["_update"])
        Q._normalise, Q._refit_scales, Q.assign = originals["_normalise"], originals["_refit_scales"], originals["assign"]


def profile_layer(shapes, device: str, backend: str, reps: int) -> dict:
    cfg = PQConfig()
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(s, generator=gen) * 0.02 for s in shapes]  # on the host, as streaming reads them
    best = None
    for _ in range(reps):
        totals = dict.fromkeys(STEPS, 0.0)
        with timed_steps(device, totals, backend):
            _sync(device)
            t0 = time.perf_counter()
            for W in weights:
                Q.quantize_pq(W, cfg, device=device)
            _sync(device)
            totals["total"] = time.perf_counter() - t0
        totals["other"] = totals["total"] - sum(totals[s] for s in STEPS)
        if best is None or totals["total"] < best["total"]:
            best = totals
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backends", default=None, help="comma list of k-means backends (default: library,torch "
                    "on the CPU, auto elsewhere: torch k-means, seeding by the CPU library)")
    ap.add_argument("--reps", type=int, default=2, help="repetitions, best kept (default 2)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    cpu = torch.device(a.device).type == "cpu"
    backends = (a.backends or ("library,torch" if cpu else "auto")).split(",")
    rows = []
    for b in backends:
        r = profile_layer(SHAPES[a.shapes], a.device, b, a.reps)
        rows.append({"backend": b, **{k: round(v, 4) for k, v in r.items()}})
        print(f"{b:>8}: one decoder layer {r['total']:.2f} s  " +
              "  ".join(f"{k} {r[k]:.2f}" for k in (*STEPS, "other")), flush=True)
    res = {"command": "python benchmarks/bench_kmeans.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "shapes": a.shapes, "device": a.device, "threads": torch.get_num_threads(),
           "config": PQConfig().to_dict(), "rows": rows}
    dest = Path(a.out) if a.out else Path(__file__).parent / "results" / f"kmeans-{a.device.split(':')[0]}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
