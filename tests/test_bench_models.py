"""benchmarks/bench_models.py: the GGUF it writes holds the HF folder's weights, as
transformers' GGUF loader (which undoes llama.cpp's Q/K permutation) reads them back."""

import importlib.util
from pathlib import Path

import torch


def _module():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_models.py"
    spec = importlib.util.spec_from_file_location("bench_models", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gguf_holds_the_same_model(tmp_path):
    from transformers import AutoModelForCausalLM

    bm = _module()
    files = bm.make_all("tiny", tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(files["hf"], dtype=torch.float32)
    gg = AutoModelForCausalLM.from_pretrained(files["f16"].parent, gguf_file=files["f16"].name, dtype=torch.float32)
    assert gg.config.num_hidden_layers == 2 and gg.config.num_key_value_heads == 2
    ids = torch.randint(0, hf.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    # bf16 weights of this size are exact in f16: the same logits up to float32 rounding
    torch.testing.assert_close(gg(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-4)
    assert bm.make_all("tiny", tmp_path) == files  # reused, not rebuilt


def test_split_of_the_tiny_model(tmp_path):
    """--split: per-token ms of the bf16 model and a fasq checkpoint, the parts adding up."""
    bm = _module()
    rows = bm.split("tiny", tmp_path, rounds=1, prompt_len=8, new_tokens=4, configs=("bf16", "fasq-d2k64"))
    assert [r["config"] for r in rows] == ["bf16", "fasq-d2k64"]
    bf16, fasq = rows
    assert bf16["quantized_linear_ms"] == 0 and bf16["dense_linear_ms"] > 0
    assert fasq["quantized_linear_ms"] > 0 and fasq["dense_linear_ms"] > 0  # the head stays dense
    for r in rows:
        parts = r["quantized_linear_ms"] + r["dense_linear_ms"] + r["rest_ms"]
        assert abs(parts - r["ms_per_token"]) < 0.01 and r["rest_ms"] > 0
