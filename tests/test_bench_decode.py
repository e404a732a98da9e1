"""benchmarks/bench_decode.py's kernel section on a tiny shape (the full run is a benchmark)."""

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture
def bench(monkeypatch):
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_decode.py"
    spec = importlib.util.spec_from_file_location("bench_decode", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "KERNEL_SHAPES", [(5, 192)])
    monkeypatch.setattr(mod, "ROTATE_BYTES", 1 << 12)
    return mod


def test_kernel_rows(bench):
    rows = bench.bench_kernels([1, 9], reps=2, bw_gbps=10.0)
    assert len(rows) == 2 * len(bench.KERNEL_CONFIGS)
    from fasq.kernels.cpu import int8 as cpu_int8

    for r in rows:
        assert r["time_us"] > 0 and r["bf16_us"] > 0 and r["speedup_vs_bf16"] > 0
        int8 = cpu_int8.available() and r["config"] in ("fasq-d2k256", "fasq-d2k64", "fasq-d1k16", "rtn-w4")  # <= 16 tokens
        assert r["kernel"] == ("cpu_int8" if int8 else "cpu_gemv" if r["tokens"] == 1 else "cpu_dequant")
    d2 = next(r for r in rows if r["config"] == "fasq-d2k256")
    assert d2["code_bytes"] == 5 * 96  # 8-bit codes, 96 per row
    assert d2["stream_us"] == round(480 / 10.0 / 1e3, 1)
    for name in ("fasq-d1k16", "rtn-w4"):  # 4-bit codes, 192 per row; the int8 copy reads two a byte
        r = next(r for r in rows if r["config"] == name)
        assert r["code_bytes"] == 5 * 96 and r["rotated_bytes"] == r["copies"] * 5 * 96
