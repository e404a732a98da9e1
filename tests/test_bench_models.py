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
