"""benchmarks/bench_kmeans.py on tiny shapes: every step is timed and the quantizer's
functions are restored afterwards."""

import importlib.util
import json
from pathlib import Path

import fasq.quant.kmeans as km
import fasq.quant.quantize as Q


def test_profile_accounts_for_every_step(tmp_path, monkeypatch):
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_kmeans.py"
    spec = importlib.util.spec_from_file_location("bench_kmeans", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setitem(mod.SHAPES, "smollm2-135m", [(192, 96), (96, 192)])
    before = (km.assign, km.init_kmeanspp, km._update, Q._normalise, Q._refit_scales, Q.assign)
    out = tmp_path / "k.json"
    mod.main(["--reps", "1", "--backends", "torch", "--out", str(out)])
    assert (km.assign, km.init_kmeanspp, km._update, Q._normalise, Q._refit_scales, Q.assign) == before
    row = json.loads(out.read_text())["rows"][0]
    assert row["backend"] == "torch" and row["total"] > 0
    assert all(row[s] > 0 for s in ("seeding", "assign", "update", "refit"))
    assert abs(sum(row[s] for s in (*mod.STEPS, "other")) - row["total"]) < 1e-3
