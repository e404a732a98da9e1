"""Streaming quantization at scale: a synthetic Llama-3-8B-shaped checkpoint (random bf16
weights of the right shapes, sharded like the Hub's) quantized by `fasq quantize`, with
wall time, peak host memory (RSS) and peak GPU memory, at several layer counts.

    python benchmarks/bench_stream.py --layers 4,8              # this CPU: RSS as layers double
    python benchmarks/bench_stream.py --layers 32 --device cuda # the full 8B shape (16 GB)

Each quantization runs in a fresh `fasq quantize` process (its own peak RSS). Timing does
not depend on the weights' values; the shapes are Llama-3-8B's. Writes
benchmarks/results/stream-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                 tie_word_embeddings=False)


def tensor_shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of a Llama-3-8B-shaped model with `layers` decoder layers, in file order."""
    h, f, v = LLAMA3_8B["hidden_size"], LLAMA3_8B["intermediate_size"], LLAMA3_8B["vocab_size"]
    kv = h // LLAMA3_8B["num_attention_heads"] * LLAMA3_8B["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                (p + "mlp.down_proj.weight", (h, f))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def write_synthetic(folder: Path, layers: int, shard_bytes: int, seed: int = 0) -> int:
    """Write the checkpoint in shards of at most `shard_bytes` (bf16); returns total bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shards, cur, size = [], {}, 0
    for name, shape in tensor_shapes(layers):
        n = 2 * int(torch.Size(shape).numel())
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = shape
        size += n
    shards.append(cur)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard.items():  # one shard in memory at a time
            if len(shape) == 1:
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:  # init-scale weights: N(0, 0.02)
                tensors[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
            weight_map[name] = fname
            total += 2 * tensors[name].numel()
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": layers,
           "hidden_act": "silu", "torch_dtype": "bfloat16", **LLAMA3_8B}
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    return total


def quantize(src: Path, out: Path, device: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "fasq.cli", "quantize", str(src), "--out", str(out), "--overwrite", "--json",
           "--device", device, *extra]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["process_seconds"] = time.perf_counter() - t0
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="4,8", help="comma list of decoder layer counts (default 4,8)")
    ap.add_argument("--device", default="cpu", help="where k-means runs: cpu or cuda (default cpu)")
    ap.add_argument("--shard-gb", type=float, default=2.0, help="input shard size in GB (default 2)")
    ap.add_argument("--workdir", default=None, help="folder for the synthetic and quantized checkpoints "
                    "(default: a temporary folder, removed at the end)")
    ap.add_argument("--quantize-args", default="", help="extra `fasq quantize` arguments, e.g. '-K 64'")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/stream-<device>.json)")
    a = ap.parse_args(argv)
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="fasq-bench-stream-"))
    rows = []
    try:
        for L in (int(x) for x in a.layers.split(",")):
            src, out = work / f"llama3-8b-shaped-{L}L", work / f"fasq-{L}L"
            t0 = time.perf_counter()
            in_bytes = write_synthetic(src, L, int(a.shard_gb * 1e9))
            write_s = time.perf_counter() - t0
            res = quantize(src, out, a.device, a.quantize_args.split())
            s = res["streaming"]
            row = {"layers": L, "input_bytes": in_bytes, "input_shards": s["shards"],
                   "output_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
                   "write_input_seconds": write_s, "wall_seconds": res["process_seconds"],
                   "quantize_seconds": res["seconds"], "seconds_per_decoder_layer": res["seconds"] / L,
                   "peak_rss_bytes": s["peak_rss_bytes"], "peak_gpu_bytes": s.get("peak_gpu_bytes"),
                   "bits_per_weight": res["bits_per_weight"], "mean_rel_error": res["mean_rel_error"]}
            rows.append(row)
            print(f"{L:>3} layers  in {in_bytes / 1e9:6.2f} GB ({s['shards']} shards)  out "
                  f"{row['output_bytes'] / 1e9:5.2f} GB  wall {row['wall_seconds']:7.1f} s  quantize "
                  f"{row['quantize_seconds']:7.1f} s ({row['seconds_per_decoder_layer']:.1f} s/layer)  peak RSS "
                  f"{row['peak_rss_bytes'] / 1e9:5.2f} GB", flush=True)
            shutil.rmtree(src)
            shutil.rmtree(out)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    result = {"command": "python benchmarks/bench_stream.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "device": a.device, "machine": platform.processor() or platform.machine(),
              "cpu_threads": torch.get_num_threads(), "shapes": "Llama-3-8B (hidden 4096, ffn 14336, "
              "32 heads, 8 kv heads, vocab 128256), random bf16 weights", "rows": rows}
    if a.device.startswith("cuda") and torch.cuda.is_available():
        result["gpu"] = torch.cuda.get_device_name()
    dest = Path(a.out) if a.out else Path(__file__).parent / "results" / f"stream-{a.device.split(':')[0]}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
