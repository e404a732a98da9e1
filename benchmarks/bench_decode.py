"""Decode speed on the CPU: the fasq kernel against torch's bf16 matmul, and whole models
against their uncompressed source (and llama.cpp when it is installed).

    python benchmarks/bench_decode.py --device cpu                 # everything, writes JSON
    python benchmarks/bench_decode.py --device cpu --only kernels  # kernel rows only
    python benchmarks/bench_decode.py --device cpu --llama-cpp-python .venv-llamacpp/bin/python

Output: a table on stdout and benchmarks/results/decode-cpu.json with top-level `device`,
`threads`, `copy_bandwidth_gbps`, `kernels_command` / `rows_command` (what made each
section), `rows` (models: `config`, `batch`, `tok_s`,
`prefill_tok_s`, `speedup_vs_bf16`, `weight_bytes`, `compiled`) and `kernels` (`out`,
`in`, `tokens`, `d`, `K`, `time_us`, `bf16_us`, `speedup_vs_bf16` (medians), the same as
`*_min` (the fastest repetition), `kernel` (the path taken), `call` ("op": through
torch.ops.fasq.pq_linear as a model calls it; "forced": the kernel forced through the
Python implementation, for rows automatic selection would not send to it), `code_bytes`,
`stream_us`: the time to read the codes at the measured copy bandwidth).

Method. Kernels: Llama-3-8B shapes (4096x4096, 14336x4096) and the default model's
(576x576, 192x576, 1536x576, 576x1536), random codes (timing does not depend on values),
the default scope (a codebook per 96+ subspaces, a scale per 96+ columns; RTN: a scale
and a minimum per group), bf16 activations and codebooks as in a bf16 model. Each timed
call cycles through enough copies of the layer (at most --max-copies) that they span --rotate-mb (64 MB by default: twice the L3 of
the machine this was written on), so codes and weights come from memory as in a real
forward pass; bf16 and every config are timed in turn within each repetition (a slow
spell of a shared machine hits all alike); time per call = median over repetitions of
the pass time / copies. The `fasq-d2k256-4k` row is the default format with its int8
copies in 4 KiB pages instead of huge pages (fasq/kernels/cpu/memory.py): what the pages
are worth, in the same run. Models: `fasq.eval.speed.measure` (static KV cache, batch 1, a
128-token prompt, 64 greedy steps), eager and under torch.compile: all models are loaded
and warmed up first, then timed in turn over 5 rounds (each reports its best round); checkpoints are made with `fasq quantize` in --runs-dir
(reused when present). Every row is measured in the same run, side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ROTATE_BYTES = 64 << 20

# (name, fasq quantize arguments); RTN uses groups of 192 columns because 128 does not
# divide the default model's width (576). d=4 K=4096 fits its codebooks on a sample of
# 8192 sub-vectors in 4 iterations: the full fit takes ~15 min on 2 cores (issue 13) and
# decode speed does not depend on the codebook values, only on the format.
MODEL_CONFIGS = [
    ("fasq-d2k256", []),
    ("fasq-d2k64", ["-d", "2", "-K", "64"]),
    ("fasq-d4k4096", ["-d", "4", "-K", "4096", "--kmeans-sample", "8192", "--kmeans-iters", "4"]),
    ("rtn-w4g192", ["--method", "rtn", "--bits", "4", "--group-size", "192"]),
    ("fasq-d2k256-head8", ["--lm-head", "rtn8"]),  # the default with the output head at RTN 8-bit
]
KERNEL_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (4096, 4096), (14336, 4096)]
# (name, d, K, exact): exact rows keep the float kernels (FASQ_CPU_INT8=0: cpu_gemv up to 6
# tokens, else rebuild + matmul); the others take cpu_int8 wherever it takes the layer (for
# fasq-d1k16 automatic selection does so only with FASQ_CPU_INT8=all). "rtn-*" rows are RTN layers (a grid codebook, a scale
# and a minimum per group; "rtn-w8": 8 bits, as --lm-head rtn8), "fasq-d1k16" PQ at d=1 K=16 in the default scope.
KERNEL_CONFIGS = [("fasq-d2k256", 2, 256, False), ("fasq-d2k256-exact", 2, 256, True),
                  ("fasq-d2k256-4k", 2, 256, False), ("fasq-d2k64", 2, 64, False),
                  ("fasq-d4k4096", 4, 4096, False), ("fasq-d1k16", 1, 16, False), ("fasq-d1k16-exact", 1, 16, True),
                  ("rtn-w4", 1, 16, False), ("rtn-w4-exact", 1, 16, True), ("rtn-w8", 1, 256, False)]
# "-4k" rows: the int8 copies made in ordinary 4 KiB pages (FASQ_CPU_HUGEPAGES=0 while the
# layers are prepared) instead of huge pages (fasq/kernels/cpu/memory.py), timed in the same run
PAGES_4K = "-4k"
# and "dense-bf16": fasq::dense_linear's CPU kernel (the decode path of the layers a fasq model
# keeps dense, its output head) on the bf16 row's own weights, where it takes the call
DENSE = "dense-bf16"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def copy_bandwidth_gbps(nbytes: int = 256 << 20) -> float:
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(5))
    return 2 * nbytes / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _interleaved_us(groups: dict, reps: int) -> dict:
    """Per-call microseconds of each group of calls: every repetition times one pass over
    every group in turn (so a slow spell of the machine hits all of them alike); the
    median over repetitions of (pass time / calls in the group)."""
    for calls in groups.values():
        for c in calls[:2]:
            c()
    times = {name: [] for name in groups}
    for _ in range(reps):
        for name, calls in groups.items():
            times[name].append(_timed(lambda: [c() for c in calls]) / len(calls))
    return {name: (sorted(t)[len(t) // 2] * 1e6, min(t) * 1e6) for name, t in times.items()}


def _layer(out: int, inn: int, d: int, K: int, gen: torch.Generator, rtn: bool = False):
    """Random codes, codebooks, scales (and offsets for RTN) in the default scope, bf16; RTN's
    codebook is its grid 0..K-1 (fasq.quant.quantize.quantize_rtn)."""
    from fasq.core.config import PQConfig, RTNConfig
    from fasq.core.ops import code_dtype

    cfg = RTNConfig(bits=K.bit_length() - 1, group_size=128 if inn % 128 == 0 else 192) if rtn else PQConfig(d=d, K=K)
    C, S = cfg.num_codebooks(inn), inn // cfg.scale_group_size(inn)
    codes = torch.randint(0, K, (out, inn // d), generator=gen).to(code_dtype(K))
    cb = (torch.arange(K, dtype=torch.float32).view(1, K, 1) if rtn else torch.randn(C, K, d, generator=gen))
    scales = (torch.rand(out, S, generator=gen) + 0.5).to(torch.bfloat16)
    offsets = torch.randn(out, S, generator=gen).to(torch.bfloat16) if rtn else None
    return codes, cb.to(torch.bfloat16), scales, offsets


def _read_bytes(out: int, inn: int, d: int, K: int) -> int:
    """Code bytes a decode call reads: the int8 path's copy at d=1 K<=16 holds two codes a
    byte; otherwise the codes in memory (1 byte each up to K=256, else 2)."""
    return out * inn // 2 if d == 1 and K <= 16 else out * (inn // d) * (1 if K <= 256 else 2)


def _how(kernel: str, layer) -> str:
    """How a row's calls are made: "op", torch.ops.fasq.pq_linear as a model calls it, where
    automatic selection takes this kernel (the int8 path's layers taken by default: the C++ op
    runs them); "forced", the kernel named through the Python implementation (the exact rows,
    and d=1 K=16, which the int8 path takes only when asked)."""
    from fasq.kernels.cpu import int8 as cpu_int8

    prep = cpu_int8.prepared(*layer, None) if kernel == "cpu_int8" else None
    return "op" if prep is not None and prep.default else "forced"


def _kernel_name(T: int, layer, exact: bool) -> str:
    from fasq.kernels.cpu import int8 as cpu_int8
    from fasq.kernels.dispatch import CPU_GEMV_MAX_TOKENS, CPU_INT8_MAX_TOKENS

    if not exact and T <= CPU_INT8_MAX_TOKENS and cpu_int8.prepared(*layer, None) is not None:
        return "cpu_int8"
    return "cpu_gemv" if T <= CPU_GEMV_MAX_TOKENS else "cpu_dequant"


def bench_kernels(tokens_list, reps: int, bw_gbps: float, rotate_bytes: int | None = None,
                  max_copies: int = 64, only: list[str] | None = None) -> list[dict]:
    """only: the KERNEL_CONFIGS names (and/or DENSE) to time beside bf16 (default all)."""
    from fasq.core.format import packed_row_bytes
    from fasq.kernels.cpu import dense, int8 as cpu_int8, linear as cpu_linear
    from fasq.kernels.dispatch import CPU_DENSE_MAX_TOKENS

    configs = [c for c in KERNEL_CONFIGS if not only or c[0] in only]
    with_dense = (not only or DENSE in only) and dense.available()

    rotate_bytes = ROTATE_BYTES if rotate_bytes is None else rotate_bytes

    gen = torch.Generator().manual_seed(0)
    rows = []
    for out, inn in KERNEL_SHAPES:
        n_w = max(2, min(max_copies, rotate_bytes // (2 * out * inn)))
        weights = [torch.randn(out, inn, generator=gen).to(torch.bfloat16) for _ in range(n_w)]
        layer_sets = {}
        for name, d, K, _ in configs:  # the same layers for every token count
            n = max(2, min(max_copies, rotate_bytes // _read_bytes(out, inn, d, K)))
            layer_sets[name] = layer_sets.get(name.removesuffix("-exact")) or [
                _layer(out, inn, d, K, gen, rtn=name.startswith("rtn")) for _ in range(n)]
            if name.endswith(PAGES_4K):  # prepared now, before any call makes its copies in huge pages
                with _env("FASQ_CPU_HUGEPAGES", "0"):
                    for L in layer_sets[name]:
                        cpu_int8.prepared(*L, None)
        for T in tokens_list:
            x = torch.randn(T, inn, generator=gen).to(torch.bfloat16)
            groups = {"bf16": [lambda W=W: torch.nn.functional.linear(x, W) for W in weights]}
            kernels, calls = {}, {DENSE: "forced"}
            for name, d, K, exact in configs:
                layers = layer_sets[name]
                kernels[name] = k = _kernel_name(T, layers[0], exact)
                calls[name] = _how(k, layers[0])
                groups[name] = ([lambda L=L: torch.ops.fasq.pq_linear(x, *L, None) for L in layers] if calls[name] == "op"
                                else [lambda L=L, k=k: cpu_linear.pq_linear_cpu(x, *L, kernel=k) for L in layers])
            if with_dense and T <= CPU_DENSE_MAX_TOKENS:
                groups[DENSE] = [lambda W=W: dense.linear(x, W) for W in weights]
                kernels[DENSE] = "cpu_dense"
            us = _interleaved_us(groups, reps)
            for name, d, K, _ in [*configs, *([(DENSE, None, None, None)] if DENSE in groups else [])]:
                code_bytes = 2 * out * inn if name == DENSE else out * packed_row_bytes(inn // d, K.bit_length() - 1)
                (med, low), (bmed, blow) = us[name], us["bf16"]
                row = {"config": name, "out": out, "in": inn, "tokens": T, "d": d, "K": K,
                       "time_us": round(med, 1), "bf16_us": round(bmed, 1),
                       "speedup_vs_bf16": round(bmed / med, 3), "code_bytes": code_bytes,
                       # the fastest repetition: what a quiet machine gives (a shared one
                       # slows some repetitions by preempting one of the threads)
                       "time_us_min": round(low, 1), "bf16_us_min": round(blow, 1),
                       "speedup_vs_bf16_min": round(blow / low, 3),
                       "stream_us": round(code_bytes / bw_gbps / 1e3, 1), "kernel": kernels[name], "call": calls[name],
                       "copies": len(groups[name]),
                       "rotated_bytes": len(groups[name]) * (code_bytes if name == DENSE else _read_bytes(out, inn, d, K))}
                rows.append(row)
                print(f"  {out:>5}x{inn:<5} T={T:<2} {name:<17} {row['time_us']:9.1f} us  bf16 {row['bf16_us']:9.1f} us"
                      f"  x{row['speedup_vs_bf16']:5.2f}  min {row['time_us_min']:8.1f} / {row['bf16_us_min']:8.1f} us"
                      f"  x{row['speedup_vs_bf16_min']:5.2f}  (codes stream {row['stream_us']:.1f} us)", flush=True)
            del groups
        del weights, layer_sets
        gc.collect()
    return rows


def fasq_checkpoint(source: str, out: Path, args: list[str]) -> Path:
    """`fasq quantize source --out out *args`, unless a checkpoint is there already."""
    from fasq.io.manifest import is_checkpoint

    if not is_checkpoint(out):
        print(f"  quantizing {out.name} -> {out}", flush=True)
        r = subprocess.run([sys.executable, "-m", "fasq.cli", "quantize", source, "--out", str(out),
                            "--overwrite", *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"fasq quantize {out.name} failed:\n{r.stderr[-2000:]}")
    return out


def _checkpoint(runs: Path, name: str, args: list[str]) -> Path:
    return fasq_checkpoint("default", runs / name, args)


@contextlib.contextmanager
def _env(var: str, value: str):
    """The environment variable set to value inside the block, as it was after."""
    old = os.environ.get(var)
    os.environ[var] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[var]
        else:
            os.environ[var] = old


def _run_as(name: str, fn):
    """fn(), with the int8 kernel off for the '-exact' rows."""
    if not name.endswith("-exact"):
        return fn()
    with _env("FASQ_CPU_INT8", "0"):
        return fn()


def bench_models(runs: Path, prompt_len: int, new_tokens: int, modes: list[bool], rounds: int,
                 only: list[str] | None = None) -> list[dict]:
    """All models are loaded (and compiled) first; then every round times each in turn,
    and each reports its best round, so a slow spell of the machine hits all alike."""
    from fasq.eval import speed
    from fasq.io.sources import load_model

    want = lambda name: not only or name in only  # noqa: E731
    cases = [c for c in [("fp32", "default", torch.float32), ("bf16", "default", torch.bfloat16)] if want(c[0])]
    cases += [(name, str(_checkpoint(runs, name, args)), torch.bfloat16) for name, args in MODEL_CONFIGS
              if want(name) or (name == "fasq-d2k256" and want(name + "-exact"))]
    # the default checkpoint once more through the exact float kernels (FASQ_CPU_INT8=0 while it runs)
    cases += [(name + "-exact", source, dtype) for name, source, dtype in cases
              if name == "fasq-d2k256" and want(name + "-exact")]
    cases = [c for c in cases if want(c[0])]
    rows = []
    label = lambda src: str(Path(src).relative_to(ROOT)) if Path(src).is_relative_to(ROOT) else src  # noqa: E731
    for compiled in modes:
        runners = {}
        for name, source, dtype in cases:
            model, tok = load_model(source, dtype=dtype)
            ids = tok("The capital of France is", return_tensors="pt").input_ids[0]
            runners[name] = (source, dtype, speed.DecodeRunner(model, ids, prompt_len=prompt_len,
                                                               new_tokens=new_tokens, compile=compiled))
            _run_as(name, runners[name][2].warm_up)
        timed = {name: [] for name in runners}
        for _ in range(rounds):
            for name, (_, _, r) in runners.items():
                timed[name].append(_run_as(name, r.run))
        for name, (source, dtype, r) in runners.items():
            s = r.speed(timed[name])
            row = {"config": name, "model": label(source), "dtype": str(dtype).removeprefix("torch."), "batch": 1,
                   "compiled": compiled, "tok_s": round(s.decode_tok_s, 2),
                   "prefill_tok_s": round(s.prefill_tok_s, 1), "weight_bytes": speed.weight_bytes(r.model),
                   "decode_tok_s_rounds": [round(new_tokens / d, 2) for _, d in timed[name]]}
            rows.append(row)
        base = next(r["tok_s"] for r in rows if r["config"] == "bf16" and r["compiled"] == compiled)
        for row in rows:
            if row["compiled"] == compiled:
                row["speedup_vs_bf16"] = round(row["tok_s"] / base, 3)
                print(f"  {row['config']:<13} compile={compiled!s:<5} decode {row['tok_s']:7.2f} tok/s "
                      f"(x{row['speedup_vs_bf16']:.2f} bf16)  prefill {row['prefill_tok_s']:8.1f} tok/s  "
                      f"{row['weight_bytes'] / 1e6:7.1f} MB", flush=True)
        del runners
        gc.collect()
        torch._dynamo.reset()
    return rows


def time_split(model, ids, prompt_len: int, new_tokens: int, rounds: int) -> dict:
    """Per decode token (eager, batch 1): ms in the quantized linear layers, in the other
    linear layers (lm_head; every projection of an unquantized model) and in the rest
    (attention, norms, embedding, argmax, Python), from forward hooks on one-token calls.
    The best of `rounds` decodes; the hooks' own cost (a few us per call) lands in the rest."""
    from torch import nn

    from fasq.core.module import PQLinear
    from fasq.eval import speed

    spent, started = {"quantized": 0.0, "dense": 0.0}, {}

    def pre(mod, args):
        if args[0].shape[-2] == 1:  # a decode step, not the prefill
            started[mod] = time.perf_counter()

    def post(kind):
        def hook(mod, args, out):
            if mod in started:
                spent[kind] += time.perf_counter() - started.pop(mod)
        return hook

    handles = []
    for mod in model.modules():
        kind = "quantized" if isinstance(mod, PQLinear) else "dense" if isinstance(mod, nn.Linear) else None
        if kind:
            handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post(kind))]
    try:
        r = speed.DecodeRunner(model, ids, prompt_len=prompt_len, new_tokens=new_tokens)
        r.warm_up()
        best = None
        for _ in range(rounds):
            spent.update(quantized=0.0, dense=0.0)
            _, dec = r.run()
            if best is None or dec < best[0]:
                best = (dec, dict(spent))
    finally:
        for h in handles:
            h.remove()
    dec, s = best
    per = lambda x: round(1e3 * x / new_tokens, 3)  # noqa: E731
    return {"ms_per_token": per(dec), "quantized_linear_ms": per(s["quantized"]), "dense_linear_ms": per(s["dense"]),
            "rest_ms": per(dec - s["quantized"] - s["dense"])}


def bench_split(runs: Path, prompt_len: int, new_tokens: int, rounds: int) -> list[dict]:
    """`time_split` of the bf16 model and of the default fasq checkpoint (int8 and exact paths,
    and with its head at RTN 8-bit: then lm_head counts among the quantized linears)."""
    from fasq.io.sources import load_model

    rows = []
    head8 = dict(MODEL_CONFIGS)["fasq-d2k256-head8"]
    for name, source in [("bf16", "default"), ("fasq-d2k256", str(_checkpoint(runs, "fasq-d2k256", []))),
                         ("fasq-d2k256-exact", str(runs / "fasq-d2k256")),
                         ("fasq-d2k256-head8", str(_checkpoint(runs, "fasq-d2k256-head8", head8)))]:
        model, tok = load_model(source, dtype=torch.bfloat16)
        ids = tok("The capital of France is", return_tensors="pt").input_ids[0]
        row = {"config": name, **_run_as(name, lambda m=model, i=ids: time_split(m, i, prompt_len, new_tokens, rounds))}
        print(f"  {name:<18} {row['ms_per_token']:7.2f} ms/token: quantized linears {row['quantized_linear_ms']:6.2f}, "
              f"other linears {row['dense_linear_ms']:6.2f}, rest {row['rest_ms']:6.2f}", flush=True)
        rows.append(row)
        del model
        gc.collect()
    return rows


LLAMA_CPP = r"""
import json, sys, time
from llama_cpp import Llama
path, threads, prompt_len, new_tokens, reps = sys.argv[1], *map(int, sys.argv[2:6])
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=prompt_len + new_tokens + 8,
            verbose=False)
ids = llm.tokenize(b"The capital of France is")
ids = (ids * (prompt_len // len(ids) + 1))[:prompt_len]
pre, dec = [], []
for rep in range(reps + 1):  # the first pass warms up
    llm.reset()
    t0 = time.perf_counter(); llm.eval(ids); t1 = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([llm.sample(temp=0.0)])
    t2 = time.perf_counter()
    if rep:
        pre.append(t1 - t0); dec.append(t2 - t1)
print(json.dumps({"prefill_s": min(pre), "decode_s": min(dec)}))
"""


def llama_cpp_times(python: str, path: Path, prompt_len: int, new_tokens: int, reps: int = 5) -> tuple[float, float]:
    """(prefill s, decode s) of a GGUF through llama-cpp-python in a fresh process, on this
    process's thread count: the best of `reps` passes after a warm-up pass."""
    r = subprocess.run([python, "-c", LLAMA_CPP, str(path), str(torch.get_num_threads()), str(prompt_len),
                        str(new_tokens), str(reps)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"llama.cpp on {Path(path).name} failed:\n{r.stderr[-2000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return res["prefill_s"], res["decode_s"]


def bench_llama_cpp(python: str, prompt_len: int, new_tokens: int) -> dict | None:
    from fasq.io.sources import default_model_file

    gguf = default_model_file()
    try:
        prefill_s, decode_s = llama_cpp_times(python, gguf, prompt_len, new_tokens)
    except RuntimeError as e:
        print(f"  {e}")
        return None
    row = {"config": "llama.cpp-q4_1", "model": gguf.name, "dtype": "q4_1", "batch": 1, "compiled": None,
           "tok_s": round(new_tokens / decode_s, 2), "prefill_tok_s": round(prompt_len / prefill_s, 1),
           "weight_bytes": gguf.stat().st_size}
    print(f"  llama.cpp     decode {row['tok_s']:7.2f} tok/s  prefill {row['prefill_tok_s']:8.1f} tok/s", flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu"], default="cpu",
                    help="cpu (the GPU decode benchmark of the CUDA kernels is not written yet)")
    ap.add_argument("--only", choices=["kernels", "models", "split"], default=None,
                    help="one section: kernel rows, whole-model rows, or the per-token time split")
    ap.add_argument("--tokens", default="1,4,16", help="kernel token counts (default 1,4,16)")
    ap.add_argument("--rotate-mb", type=int, default=ROTATE_BYTES >> 20,
                    help="MB of layer copies each kernel row cycles through (default %(default)s)")
    ap.add_argument("--shapes", default=None, help="kernel shapes, e.g. 4096x4096,576x576 (default all)")
    ap.add_argument("--max-copies", type=int, default=64, help="at most this many copies of a layer (default 64)")
    ap.add_argument("--configs", default=None, help="model rows to run, comma-separated (default all)")
    ap.add_argument("--kernel-configs", default=None,
                    help=f"kernel rows to time beside bf16, comma-separated, of {[c[0] for c in KERNEL_CONFIGS] + [DENSE]}"
                         " (default all)")
    ap.add_argument("--reps", type=int, default=15, help="kernel repetitions (median)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--modes", default="eager,compile", help="model timing modes (default eager,compile)")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds over all models (best reported)")
    ap.add_argument("--runs-dir", default=str(ROOT / "runs" / "bench"), help="where checkpoints are made/reused")
    ap.add_argument("--llama-cpp-python", default=None, help="a Python with llama-cpp-python installed "
                    "(default: this one, if it has it)")
    ap.add_argument("--out", default=str(RESULTS / "decode-cpu.json"))
    a = ap.parse_args(argv)

    from fasq.kernels.cpu import library as cpu

    if not cpu.available():
        print("the fasq CPU kernel is unavailable here: nothing to measure", file=sys.stderr)
        return 1
    bw = copy_bandwidth_gbps()
    command = "python benchmarks/bench_decode.py " + " ".join(argv if argv is not None else sys.argv[1:])
    res = {"device": cpu_name(), "isa": cpu.isa(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "copy_bandwidth_gbps": round(bw, 1), "date": time.strftime("%Y-%m-%d")}
    print(f"{res['device']} ({res['isa']}), {res['threads']} threads, copy {bw:.1f} GB/s")
    if a.shapes:
        global KERNEL_SHAPES
        KERNEL_SHAPES = [tuple(int(v) for v in sh.split("x")) for sh in a.shapes.split(",")]
    if a.only == "split":
        res["split"] = bench_split(Path(a.runs_dir), a.prompt_len, a.new_tokens, a.rounds)
        res["split_command"], res["split_threads"] = command, torch.get_num_threads()
    if a.only in (None, "kernels"):
        res["kernels"] = bench_kernels([int(t) for t in a.tokens.split(",")], a.reps, bw, a.rotate_mb << 20,
                                       a.max_copies, a.kernel_configs.split(",") if a.kernel_configs else None)
        res["kernels_rotate_mb"], res["kernels_max_copies"] = a.rotate_mb, a.max_copies
        res["kernels_command"] = command
    if a.only in (None, "models"):
        modes = [m == "compile" for m in a.modes.split(",")]
        rows = bench_models(Path(a.runs_dir), a.prompt_len, a.new_tokens, modes, a.rounds,
                            a.configs.split(",") if a.configs else None)
        py = a.llama_cpp_python
        if py is None and __import__("importlib").util.find_spec("llama_cpp") is not None:
            py = sys.executable
        if py:
            row = bench_llama_cpp(py, a.prompt_len, a.new_tokens)
            if row:
                base = next(r["tok_s"] for r in rows if r["config"] == "bf16" and r["compiled"] == modes[-1])
                row["speedup_vs_bf16"] = round(row["tok_s"] / base, 3)
                rows.append(row)
        res["rows"] = rows
        res["rows_command"] = command
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if a.only and out.is_file():  # a partial run keeps the other section (and its command) of the last run
        old = json.loads(out.read_text())
        if a.only == "split":  # the machine facts at the top describe the kernel and model rows: kept
            res = {k: v for k, v in res.items() if k.startswith("split")}
        res = {**old, **res}
    res.pop("command", None)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
