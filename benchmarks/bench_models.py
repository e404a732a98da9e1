"""Models where the weights dominate a token's time, for the CPU decode comparison:
random bf16 weights (fixed seed) in real Llama shapes, with the default model's tokenizer
and vocabulary, as a Hugging Face folder and as GGUF files for llama.cpp.

    python benchmarks/bench_models.py llama-1b [--runs-dir runs/bench-models]
        [--llama-cpp-python .venv-llamacpp/bin/python]

Makes (reused when present) in RUNS/NAME/:
  hf/              the model (bf16 safetensors, config, tokenizer)
  model-f16.gguf   the same weights for llama.cpp (f16: bf16 values of this size are exact
                   in f16), tensors named and Q/K permuted as llama.cpp's converter does,
                   the tokenizer copied from the default model's GGUF
  model-Q4_0.gguf, model-Q4_K_M.gguf, model-IQ4_XS.gguf
                   quantized by llama.cpp's own quantizer (through llama-cpp-python; no
                   importance matrix), when --llama-cpp-python is given
Timing does not depend on the values, so random weights time exactly like trained ones;
`benchmarks/bench_decode.py --model NAME` uses these files.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {
    # Llama-3.2-1B: 16 layers, hidden 2048, MLP 8192, 32 query / 8 KV heads, tied embeddings
    "llama-1b": dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                     num_key_value_heads=8, tie_word_embeddings=True),
    # Llama-3-8B cut to its first 4 layers (untied embeddings, as the model)
    "llama-8b-4l": dict(num_hidden_layers=4, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                        num_key_value_heads=8, tie_word_embeddings=False),
    # for the tests of this script
    "tiny": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False),
}
LLAMA_CPP_TYPES = {"Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
                   "IQ4_XS": "LLAMA_FTYPE_MOSTLY_IQ4_XS"}


def make_hf(name: str, out: Path, seed: int = 0) -> Path:
    """The HF folder of model `name`: random weights (std 0.02, as Llama's init), bf16."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fasq.sources import default_model_file

    if (out / "config.json").is_file():
        return out
    f = default_model_file()
    tok = AutoTokenizer.from_pretrained(f.parent, gguf_file=f.name)
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=8192,
                      rope_parameters={"rope_theta": 500000.0, "rope_type": "default"},
                      rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      **SHAPES[name])
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's q/k rows -> llama.cpp's rope layout (what its convert_hf_to_gguf.py does)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, i, rest = hf.split(".", 3)  # model.layers.I.<module>.weight
    module = rest.rsplit(".", 1)[0]
    return f"blk.{i}.{GGUF_NAMES[module]}.weight"


def make_gguf(hf_dir: Path, path: Path) -> Path:
    """The HF folder's weights as an f16 GGUF llama.cpp loads (norms in f32, as it keeps them)."""
    import gguf
    from safetensors import safe_open

    from fasq.manifest import tensor_files
    from fasq.sources import default_model_file

    if path.is_file():
        return path
    cfg = json.loads((hf_dir / "config.json").read_text())
    w = gguf.GGUFWriter(str(path.with_suffix(".tmp")), "llama")
    w.add_name(hf_dir.parent.name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base((cfg.get("rope_parameters") or cfg)["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    src = gguf.GGUFReader(str(default_model_file()))  # the same tokenizer as the HF folder
    for key, field in src.fields.items():
        if key.startswith("tokenizer."):
            value = field.contents()
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, value, vtype, sub_type=sub)
    for shard in tensor_files(hf_dir):
        with safe_open(str(hf_dir / shard), "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name).float().numpy()
                if name.endswith("q_proj.weight"):
                    t = _permute(t, cfg["num_attention_heads"])
                elif name.endswith("k_proj.weight"):
                    t = _permute(t, cfg["num_key_value_heads"])
                w.add_tensor(_gguf_name(name), t.astype(np.float32 if t.ndim == 1 else np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    path.with_suffix(".tmp").rename(path)
    return path


QUANTIZE = r"""
import ctypes, sys, llama_cpp
src, dst, ftype = sys.argv[1], sys.argv[2], sys.argv[3]
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = getattr(llama_cpp, ftype)
p.nthread = 2
rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p))
sys.exit(rc)
"""


def quantize_gguf(llama_python: str, src: Path, kind: str) -> Path:
    """llama.cpp's quantizer: `src` f16 GGUF -> model-KIND.gguf beside it."""
    dst = src.with_name(f"model-{kind}.gguf")
    if dst.is_file():
        return dst
    tmp = dst.with_suffix(".tmp")
    r = subprocess.run([llama_python, "-c", QUANTIZE, str(src), str(tmp), LLAMA_CPP_TYPES[kind]],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"llama.cpp quantization to {kind} failed (rc {r.returncode}):\n{r.stderr[-2000:]}")
    tmp.rename(dst)
    return dst


def make_all(name: str, runs: Path, llama_python: str | None = None) -> dict[str, Path]:
    """Every file of model `name` (see the module doc): {"hf": ..., "f16": ..., "Q4_0": ...}."""
    if name not in SHAPES:
        raise ValueError(f"unknown benchmark model {name!r}; choose one of {sorted(SHAPES)}")
    base = runs / name
    base.mkdir(parents=True, exist_ok=True)
    files = {"hf": make_hf(name, base / "hf")}
    files["f16"] = make_gguf(files["hf"], base / "model-f16.gguf")
    if llama_python:
        for kind in LLAMA_CPP_TYPES:
            files[kind] = quantize_gguf(llama_python, files["f16"], kind)
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", choices=sorted(SHAPES))
    ap.add_argument("--runs-dir", default=str(ROOT / "runs" / "bench-models"))
    ap.add_argument("--llama-cpp-python", default=None, help="a Python with llama-cpp-python (make llamacpp-env)")
    a = ap.parse_args(argv)
    files = make_all(a.model, Path(a.runs_dir), a.llama_cpp_python)
    for kind, path in files.items():
        size = sum(p.stat().st_size for p in path.rglob("*")) if path.is_dir() else path.stat().st_size
        print(f"{kind:<8} {size / 1e9:6.2f} GB  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
