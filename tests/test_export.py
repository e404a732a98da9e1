"""`fasq export`: an unquantized model as a plain HF folder (what vLLM serves)."""

import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fasq.cli import main


def test_export_writes_a_loadable_hf_folder(tiny_dir, tmp_path, capsys):
    out = tmp_path / "dense"
    assert main(["export", str(tiny_dir), "--out", str(out), "--dtype", "bfloat16"]) == 0
    tensors = load_file(out / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert "lm_head.weight" not in tensors  # tied to embed_tokens: stored once
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.arange(10)[None]
    torch.testing.assert_close(m(ids).logits, ref(ids).logits, atol=0.05, rtol=0.05)  # bf16 rounding
    assert (out / "tokenizer_config.json").is_file()


def test_export_errors_are_clear(tiny_dir, tmp_path, capsys):
    out = tmp_path / "dense"
    assert main(["export", str(tiny_dir), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["export", str(tiny_dir), "--out", str(out)]) == 2  # no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    q = tmp_path / "q"
    assert main(["quantize", str(tiny_dir), "-d", "2", "-K", "16", "--out", str(q), "--json"]) == 0
    capsys.readouterr()
    assert main(["export", str(q), "--out", str(tmp_path / "x")]) == 2
    assert "is a fasq checkpoint" in capsys.readouterr().err
