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
    from fasq.kernels.cpu import dense, int8 as cpu_int8

    rows = bench.bench_kernels([1, 9], reps=2, bw_gbps=10.0)
    dense_rows = [r for r in rows if r["config"] == bench.DENSE]
    rows = [r for r in rows if r["config"] != bench.DENSE]
    assert len(rows) == 2 * len(bench.KERNEL_CONFIGS)
    # the dense bf16 kernel: at 1 token (its limit is 4), where the CPU has it
    assert [(r["tokens"], r["kernel"], r["code_bytes"]) for r in dense_rows] == (
        [(1, "cpu_dense", 2 * 5 * 192)] if dense.available() else [])
    for r in rows:
        assert r["time_us"] > 0 and r["bf16_us"] > 0 and r["speedup_vs_bf16"] > 0
        d_k = {"fasq-d2k256": (2, 256), "fasq-d2k256-4k": (2, 256), "fasq-d2k64": (2, 64), "fasq-d1k16": (1, 16), "rtn-w4": (1, 16),
               "rtn-w8": (1, 256)}.get(r["config"])  # the configs the int8 path may take (<= 16 tokens)
        int8 = d_k is not None and cpu_int8.available(*d_k)
        assert r["kernel"] == ("cpu_int8" if int8 else "cpu_gemv" if r["tokens"] == 1 else "cpu_dequant")
        # through the op where automatic selection takes the int8 path (not d=1 K=16's float codebooks)
        assert r["call"] == ("op" if int8 and r["config"] != "fasq-d1k16" else "forced")
    d2 = next(r for r in rows if r["config"] == "fasq-d2k256")
    assert d2["code_bytes"] == 5 * 96  # 8-bit codes, 96 per row
    assert d2["stream_us"] == round(480 / 10.0 / 1e3, 1)
    for name in ("fasq-d1k16", "rtn-w4"):  # 4-bit codes, 192 per row; the int8 copy reads two a byte
        r = next(r for r in rows if r["config"] == name)
        assert r["code_bytes"] == 5 * 96 and r["rotated_bytes"] == r["copies"] * 5 * 96


def test_kernel_rows_of_chosen_configs(bench):
    rows = bench.bench_kernels([1], reps=1, bw_gbps=10.0, only=["fasq-d2k64"])
    assert [r["config"] for r in rows] == ["fasq-d2k64"]


def test_time_split_counts_only_decode_calls_of_each_kind(bench, tiny_llama):
    import copy

    import torch

    from fasq import PQConfig, QuantConfig, quantize_model

    model = copy.deepcopy(tiny_llama).eval()
    quantize_model(model, QuantConfig(layer=PQConfig(d=2, K=16, codebook_scope="matrix")), progress=False)
    calls = []
    from fasq.core.module import PQLinear

    for m in model.modules():  # one more hook: how many one-token calls the quantized layers get
        if isinstance(m, PQLinear):
            m.register_forward_pre_hook(lambda mod, a: calls.append(a[0].shape[-2]))
    s = bench.time_split(model, torch.tensor([1, 2, 3]), prompt_len=5, new_tokens=4, rounds=2)
    n_pq = sum(isinstance(m, PQLinear) for m in model.modules())
    # warm-up (3 steps) and 2 rounds of 4 steps, plus the prefills (5 tokens): only 1-token calls are decode
    assert calls.count(1) == n_pq * (3 + 2 * 4) and calls.count(5) == n_pq * 3
    assert s["quantized_linear_ms"] > 0 and s["dense_linear_ms"] > 0 and s["rest_ms"] > 0
    total = s["quantized_linear_ms"] + s["dense_linear_ms"] + s["rest_ms"]
    assert abs(total - s["ms_per_token"]) < 1e-2
