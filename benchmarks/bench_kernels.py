"""Benchmark the fasq Triton kernels against cuBLAS fp16 and dequantize-then-matmul.

    python benchmarks/bench_kernels.py --check            # full run on a CUDA GPU
    python benchmarks/bench_kernels.py --quick            # one shape, 3 token counts
    TRITON_INTERPRET=1 python benchmarks/bench_kernels.py --dry-run   # CPU smoke test

Method (see benchmarks/METHOD.md): median over repetitions of CUDA-event timings of a
batch of calls that cycles through several independent weight/activation sets (together
> 2x the L2 size, so every call streams its weights from HBM); bytes = what a call must
read (codes at their in-memory width, codebooks, scales, activations) and write (output).
Results: a table on stdout and JSON in benchmarks/results/kernels-<gpu>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

LLAMA3_8B = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]  # (out, in)
DK = [(2, 256), (2, 64), (4, 4096)]
TOKENS = [1, 4, 16, 128, 512, 2048]
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4096x4096, d=2 K=256, tokens 1, 16, 2048")
    ap.add_argument("--shapes", help="comma list of OUTxIN, e.g. 4096x4096,1024x4096")
    ap.add_argument("--tokens", help="comma list of token counts")
    ap.add_argument("--dk", help="comma list of d:K, e.g. 2:256,4:4096")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/kernels-<gpu>.json)")
    ap.add_argument("--check", action="store_true", help="verify every kernel against the reference first")
    ap.add_argument("--reps", type=int, default=20, help="timed batches per case (median reported)")
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny shapes on CPU under TRITON_INTERPRET=1, host timer; results are not saved")
    ap.add_argument("--summary", metavar="JSON",
                    help="print a markdown table (dispatched and best fasq path vs cuBLAS fp16) of a saved run; no GPU")
    return ap.parse_args(argv)


def summary(path: str) -> str:
    """Markdown table of a results file: per case, the dispatched kernel, the fastest fasq
    kernel and cuBLAS fp16 (us), the dispatched kernel's speed-up and % of copy bandwidth."""
    res = json.loads(Path(path).read_text())
    cases: dict = {}
    for r in res["rows"]:
        cases.setdefault((r["out"], r["in"], r["d"], r["K"], r["tokens"]), {})[r["kernel"]] = r
    lines = [f"{res['device']}, copy bandwidth {res['copy_bandwidth_gbps']:.0f} GB/s"
             f"{'' if res.get('complete') else ' (incomplete run)'}", "",
             "| out x in | d, K | tokens | cuBLAS fp16 us | dispatched | us | x fp16 | % copy BW | fastest fasq (us) |",
             "|---|---|---:|---:|---|---:|---:|---:|---|"]
    for (o, i, d, K, T), ks in sorted(cases.items(), key=lambda kv: (kv[0][0] * kv[0][1], kv[0])):
        fasq = {k: r for k, r in ks.items() if k not in ("cublas_fp16", "dequant_matmul")}
        disp = next(r for r in fasq.values() if r["dispatched"])
        best = min(fasq.values(), key=lambda r: r["time_us"])
        lines.append(f"| {o}x{i} | {d}, {K} | {T} | {ks['cublas_fp16']['time_us']:.1f} | {disp['kernel']} | "
                     f"{disp['time_us']:.1f} | {disp['speedup_vs_fp16']:.2f} | {disp['pct_copy_bw']:.0f} | "
                     f"{best['kernel']} ({best['time_us']:.1f}) |")
    return "\n".join(lines)


args = parse_args()
if args.summary:
    print(summary(args.summary))
    sys.exit(0)
if args.dry_run:  # must be set before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from fasq.core import ops  # noqa: E402
from fasq.core.config import PQConfig  # noqa: E402
from fasq.kernels import pq_linear_triton, select_kernel  # noqa: E402

DEV = "cpu" if args.dry_run else "cuda"


# --- timing -------------------------------------------------------------------------------

def time_batch(fns, reps: int, graph: bool = True) -> tuple[float, str]:
    """(median seconds per call, timing mode). Each repetition runs every fn of `fns` once
    (the rotation). On CUDA the rotation is captured once in a CUDA graph and replayed:
    decode runs under CUDA graphs (torch.compile "reduce-overhead", vLLM), and eager
    timing of a ~10 us kernel measures Python launch overhead instead (eager_us keeps it)."""
    for f in fns:  # warm-up (also triggers compilation and autotuning)
        f()
    run, mode = (lambda: [f() for f in fns]), "eager"
    if DEV == "cuda":
        torch.cuda.synchronize()
        if graph:
            try:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    for f in fns:
                        f()
                run, mode = g.replay, "cuda_graph"
                run()
            except Exception as e:  # noqa: BLE001 - report and fall back to eager timing
                print(f"  (graph capture failed: {type(e).__name__}: {e}; timing eagerly)", flush=True)
        torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        if DEV == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e-3 / len(fns))
        else:
            t0 = time.perf_counter()
            run()
            samples.append((time.perf_counter() - t0) / len(fns))
    return statistics.median(samples), mode


def copy_bandwidth(reps: int) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read + written."""
    n = (1 << 30) // 2 if DEV == "cuda" else 1 << 22  # 1 GiB of fp16 on the GPU
    a = torch.empty(n, dtype=torch.float16, device=DEV)
    b = torch.empty_like(a)
    t, _ = time_batch([lambda: b.copy_(a)], reps, graph=False)
    return 2 * a.numel() * a.element_size() / t / 1e9


def matmul_tflops(reps: int) -> float:
    """Achieved dense fp16 cuBLAS throughput (8192^3), for the FLOP floor."""
    n = 8192 if DEV == "cuda" else 256
    a = torch.randn(n, n, dtype=torch.float16 if DEV == "cuda" else torch.float32, device=DEV)
    t, _ = time_batch([lambda: a @ a], max(3, reps // 4), graph=False)
    return 2 * n ** 3 / t / 1e12


def l2_bytes() -> int:
    if DEV == "cuda":
        return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return 0


# --- problem sets -----------------------------------------------------------------------

def make_set(out, in_, d, K, tokens, seed):
    """One random layer in the default scope (PQConfig's codebook groups and scale
    groups for this width) and activations."""
    cfg = PQConfig(d=d, K=K)
    g = torch.Generator(device=DEV).manual_seed(seed)
    M, C, S = in_ // d, cfg.num_codebooks(in_), in_ // cfg.scale_group_size(in_)
    codes = torch.randint(0, K, (out, M), generator=g, device=DEV, dtype=torch.int32).to(ops.code_dtype(K))
    cb = torch.randn(C, K, d, generator=g, device=DEV).half()
    scales = (torch.rand(out, S, generator=g, device=DEV) * 0.02 + 0.01).half()
    x = torch.randn(tokens, in_, generator=g, device=DEV).half()
    return x, codes, cb, scales


def layer_bytes(x, codes, cb, scales, out) -> int:
    T = x.shape[0]
    return (codes.numel() * codes.element_size() + cb.numel() * cb.element_size()
            + scales.numel() * scales.element_size() + x.numel() * x.element_size() + T * out * 2)


def _has_nvrtc() -> bool:
    from fasq.kernels.cuda import gemv as cuda_gemv

    try:
        cuda_gemv.nvrtc()
        return DEV == "cuda"
    except cuda_gemv.CudaKernelError:
        return False


def candidates(tokens, d, K):
    from fasq.kernels.cuda import gemv as cuda_gemv

    names = ["gemv"] if tokens <= 16 else []
    # the CUDA C++ GEMV (NVRTC): up to 8 tokens, codebooks that fit its shared memory
    if tokens <= cuda_gemv.MAX_TOKENS and d in cuda_gemv.DS and cuda_gemv.plan(1, 1, 1, K, d) and _has_nvrtc():
        names.insert(0, "cuda_gemv")
    # The LUT path builds K-entry tables per token and subspace: with K = 4096, or past a
    # hundred tokens, it is far off the others (85 ms at 2048 tokens in a first run).
    if K <= 256 and tokens <= 128:
        names.append("lut_gemm")
    return names + ["dequant_gemm", "dequant_cublas"]


def check(sets, tokens, d, K):
    """Each kernel vs the fp32 reference on the first set; returns failures."""
    x, codes, cb, scales = sets[0]
    ref = ops.pq_linear_dequant(x.float(), codes, cb, scales)
    bad = []
    for name in candidates(tokens, d, K):
        y = pq_linear_triton(x, codes, cb, scales, kernel=name).float()
        err = ((y - ref).norm() / ref.norm()).item()
        if not err < 1e-2:
            bad.append(f"{name} {codes.shape[0]}x{x.shape[1]} T={tokens} d={d} K={K}: rel err {err:.2e}")
    return bad


def bench_case(out, in_, d, K, tokens, copy_bw, tflops, reps, do_check):
    first = make_set(out, in_, d, K, tokens, 0)
    n_sets = max(2, min(64, math.ceil(2 * l2_bytes() / layer_bytes(*first, out))))
    if args.dry_run:  # the interpreter is slow; rotation is meaningless on CPU anyway
        n_sets = 2
    sets = [first] + [make_set(out, in_, d, K, tokens, s) for s in range(1, n_sets)]
    if do_check:
        bad = check(sets, tokens, d, K)
        if bad:
            sys.exit("CHECK FAILED:\n" + "\n".join(bad))
    nbytes = layer_bytes(*sets[0], out)
    flops = 2 * tokens * out * in_
    rows, times, eager = [], {}, {}
    w16 = [ops.dequantize(c, cb, s, dtype=torch.float16) for _, c, cb, s in sets]
    n16 = max(1, min(n_sets, math.ceil(2 * l2_bytes() / (w16[0].numel() * 2))))
    fns = {"cublas_fp16": [lambda x=s[0], w=w: torch.nn.functional.linear(x, w) for s, w in zip(sets[:n16], w16[:n16])],
           "dequant_matmul": [lambda s=s: ops.pq_linear_dequant(*s) for s in sets]}
    for name in candidates(tokens, d, K):
        fns[name] = [lambda s=s, k=name: pq_linear_triton(*s, kernel=k) for s in sets]
    for name, f in fns.items():
        times[name], mode = time_batch(f, reps)
        eager[name] = time_batch(f, max(3, reps // 4), graph=False)[0] if DEV == "cuda" else times[name]
    del w16, fns
    auto = select_kernel("cuda", tokens, d, K)
    fp16_bytes = out * in_ * 2 + tokens * (in_ + out) * 2
    for name, t in times.items():
        b = fp16_bytes if name == "cublas_fp16" else nbytes
        rows.append(dict(kernel=name, out=out, **{"in": in_}, tokens=tokens, d=d, K=K, time_us=t * 1e6,
                         eager_us=eager[name] * 1e6, timing=mode,
                         bytes=b, gbps=b / t / 1e9, pct_copy_bw=100 * b / t / 1e9 / copy_bw,
                         speedup_vs_fp16=times["cublas_fp16"] / t,
                         speedup_vs_dequant_matmul=times["dequant_matmul"] / t,
                         byte_floor_us=b / (copy_bw * 1e9) * 1e6, flop_floor_us=flops / (tflops * 1e12) * 1e6,
                         dispatched=name == auto, n_sets=n_sets))
    return rows


def print_rows(rows):
    head = f"{'kernel':>15} {'out':>6} {'in':>6} {'T':>5} {'d':>2} {'K':>5} {'us':>9} {'eager':>8} {'GB/s':>7} {'%copy':>6} {'xfp16':>6} {'xdeq':>6} {'floorB':>7} {'floorF':>7}"
    print(head)
    for r in rows:
        mark = "*" if r["dispatched"] else " "
        print(f"{r['kernel']:>14}{mark} {r['out']:>6} {r['in']:>6} {r['tokens']:>5} {r['d']:>2} {r['K']:>5} "
              f"{r['time_us']:>9.2f} {r['eager_us']:>8.1f} {r['gbps']:>7.0f} {r['pct_copy_bw']:>6.1f} {r['speedup_vs_fp16']:>6.2f} "
              f"{r['speedup_vs_dequant_matmul']:>6.2f} {r['byte_floor_us']:>7.2f} {r['flop_floor_us']:>7.2f}", flush=True)


def main():
    if args.dry_run:
        shapes, tokens, dks, reps = [(37, 48), (64, 96)], [1, 17], [(2, 16), (4, 64)], 2
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_kernels.py needs a CUDA GPU (or --dry-run under TRITON_INTERPRET=1)")
        shapes, tokens, dks, reps = LLAMA3_8B, TOKENS, DK, args.reps
        if args.quick:
            shapes, tokens, dks = [(4096, 4096)], [1, 16, 2048], [(2, 256)]
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.tokens:
        tokens = [int(t) for t in args.tokens.split(",")]
    if args.dk:
        dks = [tuple(int(v) for v in s.split(":")) for s in args.dk.split(",")]
    device = torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu (TRITON_INTERPRET=1 dry run)"
    copy_bw, tflops = copy_bandwidth(reps), matmul_tflops(reps)
    print(f"device: {device}; copy bandwidth {copy_bw:.0f} GB/s (read+write); fp16 matmul {tflops:.1f} TFLOP/s")
    print("(* = the kernel select_kernel dispatches to; floorB/floorF = byte / FLOP floor in us)")
    if args.dry_run:
        if args.out and Path(args.out).resolve().is_relative_to(RESULTS):
            sys.exit("refusing to write dry-run numbers into benchmarks/results")
        path = Path(args.out) if args.out else None
    else:
        slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
        path = Path(args.out) if args.out else RESULTS / f"kernels-{slug}.json"
    result = dict(device=device, copy_bandwidth_gbps=copy_bw, fp16_matmul_tflops=tflops,
                  torch=torch.__version__, complete=False, rows=[])
    for out, in_ in shapes:
        for d, K in dks:
            for T in tokens:
                case = bench_case(out, in_, d, K, T, copy_bw, tflops, reps, args.check)
                print_rows(case)
                result["rows"] += case
                save(result, path)  # after every case: a run cut short keeps what it measured
    result["complete"] = True
    save(result, path)
    if args.dry_run:
        print(f"dry run OK: {len(result['rows'])} rows (not saved to benchmarks/results)")
    elif path:
        print(f"wrote {path}")


def save(result: dict, path: Path | None):
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)


if __name__ == "__main__":
    main()
