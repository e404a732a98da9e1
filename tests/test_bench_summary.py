"""benchmarks/bench_kernels.py --summary: the markdown table of a saved run (no GPU)."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernels.py"


def row(kernel, time_us, dispatched=False, tokens=1):
    return dict(kernel=kernel, out=64, **{"in": 96}, tokens=tokens, d=2, K=16, time_us=time_us,
                dispatched=dispatched, speedup_vs_fp16=10.0 / time_us, pct_copy_bw=100.0 / time_us)


def test_summary_names_dispatched_and_fastest(tmp_path):
    res = dict(device="Test GPU", copy_bandwidth_gbps=1000.0, complete=False,
               rows=[row("cublas_fp16", 10.0), row("dequant_matmul", 50.0), row("gemv", 20.0, True),
                     row("dequant_cublas", 12.5)])
    path = tmp_path / "k.json"
    path.write_text(json.dumps(res))
    r = subprocess.run([sys.executable, str(BENCH), "--summary", str(path)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Test GPU, copy bandwidth 1000 GB/s (incomplete run)" in r.stdout
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("| 64x96"))
    assert line == "| 64x96 | 2, 16 | 1 | 10.0 | gemv | 20.0 | 0.50 | 5 | dequant_cublas (12.5) |"
