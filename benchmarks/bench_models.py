"""Models where the weights dominate a token's time, for the CPU decode comparison:
random bf16 weights (fixed seed) in real Llama shapes, with the default model's tokenizer
and vocabulary, as a Hugging Face folder and as GGUF files for llama.cpp.

    python benchmarks/bench_models.py llama-1b [--runs-dir runs/bench-models]
        [--llama-cpp-python .venv-llamacpp/bin/python] [--bench]

Makes (reused when present) in RUNS/NAME/:
  hf/              the model (bf16 safetensors, config, tokenizer)
  model-f16.gguf   the same weights for llama.cpp (f16: bf16 values of this size are exact
                   in f16), tensors named and Q/K permuted as llama.cpp's converter does,
                   the tokenizer copied from the default model's GGUF
  model-Q4_0.gguf, model-Q4_K_M.gguf, model-IQ4_XS.gguf
                   quantized by llama.cpp's own quantizer (through llama-cpp-python; no
                   importance matrix), when --llama-cpp-python is given
Timing does not depend on the values, so random weights time exactly like trained ones.
With --bench it also times decode at batch 1 (bf16, fasq d2K256 / d2K64 / d1K16, RTN
4-bit g64, fasq d2K256 with the head at RTN 8-bit, the default again with its int8 copies in
4 KiB pages instead of huge pages (fasq-d2k256-4k), llama.cpp Q4_0 / Q4_K_M / IQ4_XS; same
threads, interleaved rounds, best round each) and writes benchmarks/results/decode-cpu-MODEL.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or loaded by path (tests)
from bench_decode import PAGES_4K, _env, fasq_checkpoint, llama_cpp_times, time_split  # noqa: E402

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

    from fasq.io.sources import default_model_file

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

    from fasq.io.manifest import tensor_files
    from fasq.io.sources import default_model_file

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


# fasq checkpoints timed against the bf16 model and llama.cpp (fasq quantize arguments);
# RTN groups of 64 columns: the 4-bit point llama.cpp's Q4 types sit at (Q4_0: 32)
FASQ_CONFIGS = [("fasq-d2k256", []), ("fasq-d2k64", ["-d", "2", "-K", "64"]),
                ("fasq-d1k16", ["-d", "1", "-K", "16"]), ("rtn-w4g64", ["--method", "rtn", "--group-size", "64"]),
                # the default with the output head at RTN 8-bit (llama.cpp's types keep theirs at Q6_K)
                ("fasq-d2k256-head8", ["--lm-head", "rtn8"])]

def bench(name: str, runs: Path, llama_python: str | None, rounds: int = 3, prompt_len: int = 128,
          new_tokens: int = 32, compile: bool = False) -> list[dict]:
    """Decode tok/s at batch 1 of the bf16 model, its fasq/RTN checkpoints and llama.cpp's
    types, on the same threads: every round times each model in turn (llama.cpp in a fresh
    process per round, after a warm-up pass); each row reports its best round."""
    from fasq.eval import speed
    from fasq.io.sources import load_model

    files = make_all(name, runs, llama_python)
    cases = [("bf16", files["hf"])] + [(c, fasq_checkpoint(str(files["hf"]), runs / name / c, args))
                                         for c, args in FASQ_CONFIGS]
    # the default once more, its int8 copies made in 4 KiB pages instead of huge pages (they
    # are made at the warm-up's first calls)
    cases.append(("fasq-d2k256" + PAGES_4K, dict(cases)["fasq-d2k256"]))
    runners = {}
    for config, path in cases:
        with _env("FASQ_CPU_HUGEPAGES", "0") if config.endswith(PAGES_4K) else contextlib.nullcontext():
            model, tok = load_model(str(path), dtype=torch.bfloat16)
            ids = tok("The capital of France is", return_tensors="pt").input_ids[0]
            runners[config] = speed.DecodeRunner(model, ids, prompt_len=prompt_len, new_tokens=new_tokens,
                                                 compile=compile)
            runners[config].warm_up()
    ggufs = {f"llama.cpp-{k}": files[k] for k in LLAMA_CPP_TYPES if k in files}
    timed = {c: [] for c in [*runners, *ggufs]}
    for r in range(rounds):
        for config, runner in runners.items():
            timed[config].append(runner.run())
        for config, path in ggufs.items():
            timed[config].append(llama_cpp_times(llama_python, path, prompt_len, new_tokens, reps=1))
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{c} {new_tokens / t[-1][1]:.1f}" for c, t in timed.items()),
              flush=True)
    rows = []
    for config, t in timed.items():
        path = files[config.removeprefix("llama.cpp-")] if config in ggufs else dict(cases)[config]
        size = path.stat().st_size if path.is_file() else speed.weight_bytes(runners[config].model)
        rows.append({"config": config, "model": name, "batch": 1, "compiled": compile if config in runners else None,
                     "tok_s": round(new_tokens / min(d for _, d in t), 2),
                     "prefill_tok_s": round(prompt_len / min(p for p, _ in t), 1), "weight_bytes": size,
                     "decode_tok_s_rounds": [round(new_tokens / d, 2) for _, d in t]})
    base = next(r["tok_s"] for r in rows if r["config"] == "bf16")
    for row in rows:
        row["speedup_vs_bf16"] = round(row["tok_s"] / base, 3)
    return rows


def split(name: str, runs: Path, rounds: int = 3, prompt_len: int = 128, new_tokens: int = 32,
          configs=("bf16", "fasq-d2k256", "fasq-d2k256-head8")) -> list[dict]:
    """Where a decode token's time goes (bench_decode.time_split: eager, batch 1, forward hooks
    on the one-token calls): ms in the quantized projections, in the dense linear layers (the
    head; every projection of the bf16 model) and in the rest, best of `rounds` decodes."""
    from fasq.io.sources import load_model

    files, args = make_all(name, runs), dict(FASQ_CONFIGS)
    rows = []
    for config in configs:
        path = files["hf"] if config == "bf16" else fasq_checkpoint(str(files["hf"]), runs / name / config, args[config])
        model, tok = load_model(str(path), dtype=torch.bfloat16)
        ids = tok("The capital of France is", return_tensors="pt").input_ids[0]
        rows.append({"config": config, **time_split(model, ids, prompt_len, new_tokens, rounds)})
        r = rows[-1]
        print(f"  {config:<18} {r['ms_per_token']:7.2f} ms/token: quantized linears {r['quantized_linear_ms']:6.2f}, "
              f"other linears {r['dense_linear_ms']:6.2f}, rest {r['rest_ms']:6.2f}", flush=True)
        del model
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", choices=sorted(SHAPES))
    ap.add_argument("--runs-dir", default=str(ROOT / "runs" / "bench-models"))
    ap.add_argument("--llama-cpp-python", default=None, help="a Python with llama-cpp-python (make llamacpp-env)")
    ap.add_argument("--bench", action="store_true", help="also time decode (bf16, fasq, RTN, llama.cpp) and write "
                    "benchmarks/results/decode-cpu-MODEL.json")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--compile", action="store_true", help="torch.compile the torch models' decode step")
    ap.add_argument("--split", action="store_true", help="instead of --bench: where a decode token's time goes "
                    "(bf16, the default, its 8-bit head; eager) into benchmarks/results/decode-cpu-MODEL-split.json")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/decode-cpu-MODEL.json)")
    a = ap.parse_args(argv)
    files = make_all(a.model, Path(a.runs_dir), a.llama_cpp_python)
    for kind, path in files.items():
        size = sum(p.stat().st_size for p in path.rglob("*")) if path.is_dir() else path.stat().st_size
        print(f"{kind:<8} {size / 1e9:6.2f} GB  {path}")
    if not (a.bench or a.split):
        return 0
    if a.split:
        rows = split(a.model, Path(a.runs_dir), rounds=a.rounds, new_tokens=a.new_tokens)
    else:
        rows = bench(a.model, Path(a.runs_dir), a.llama_cpp_python, rounds=a.rounds, new_tokens=a.new_tokens,
                     compile=a.compile)
        print(f"{'config':<18}{'decode tok/s':>13}{'x bf16':>8}{'prefill tok/s':>15}{'MB':>9}")
        for r in rows:
            print(f"{r['config']:<18}{r['tok_s']:>13.2f}{r['speedup_vs_bf16']:>8.2f}{r['prefill_tok_s']:>15.1f}"
                  f"{r['weight_bytes'] / 1e6:>9.0f}")
    from fasq.kernels.cpu import library as cpu

    res = {"model": a.model, "shape": SHAPES[a.model], "threads": torch.get_num_threads(), "isa": cpu.isa(),
           "date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/bench_models.py " + " ".join(
               argv if argv is not None else sys.argv[1:]), "rows": rows}
    default = f"decode-cpu-{a.model}{'-split' if a.split else ''}.json"
    out = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / default
    out.with_suffix(".tmp").write_text(json.dumps(res, indent=1))
    out.with_suffix(".tmp").replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
