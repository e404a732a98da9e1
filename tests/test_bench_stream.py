"""benchmarks/bench_stream.py end to end on a tiny Llama-shaped model (the real run is the
8B shape: a benchmark, not a test)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
from safetensors import safe_open


@pytest.fixture
def bench(monkeypatch):
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_stream.py"
    spec = importlib.util.spec_from_file_location("bench_stream", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setitem(mod.LLAMA3_8B, "hidden_size", 128)
    monkeypatch.setitem(mod.LLAMA3_8B, "intermediate_size", 384)
    monkeypatch.setitem(mod.LLAMA3_8B, "num_attention_heads", 4)
    monkeypatch.setitem(mod.LLAMA3_8B, "num_key_value_heads", 2)
    monkeypatch.setitem(mod.LLAMA3_8B, "vocab_size", 512)
    return mod


def test_synthetic_checkpoint_is_sharded_with_llama_shapes(bench, tmp_path):
    total = bench.write_synthetic(tmp_path / "m", layers=2, shard_bytes=200_000)
    index = json.loads((tmp_path / "m/model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and index["metadata"]["total_size"] == total
    with safe_open(str(tmp_path / "m" / index["weight_map"]["model.layers.1.mlp.down_proj.weight"]), "pt") as f:
        t = f.get_tensor("model.layers.1.mlp.down_proj.weight")
    assert tuple(t.shape) == (128, 384) and 0.015 < t.float().std().item() < 0.025
    assert total == 2 * sum(math.prod(s) for _, s in bench.tensor_shapes(2))


def test_bench_quantizes_and_reports_memory(bench, tmp_path):
    out = tmp_path / "res.json"
    bench.main(["--layers", "1,2", "--shard-gb", "0.0002", "--workdir", str(tmp_path / "w"), "--out", str(out),
                "--quantize-args", "-K 16 --kmeans-iters 2"])
    res = json.loads(out.read_text())
    assert [r["layers"] for r in res["rows"]] == [1, 2]
    for r in res["rows"]:
        assert r["input_shards"] > 1 and 0 < r["output_bytes"] < r["input_bytes"]
        assert r["peak_rss_bytes"] > 10e6 and r["quantize_seconds"] > 0
    assert not any((tmp_path / "w").iterdir())  # inputs and outputs removed as it goes
