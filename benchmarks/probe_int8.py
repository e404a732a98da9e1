"""Compile and run the int8 lookup microbenchmark (benchmarks/csrc/probe_int8_lookup.cpp)
and record its results in benchmarks/results/cpu-int8-probe.json.

    python benchmarks/probe_int8.py [--rounds 5] [--rotate-mb 1024]
    python benchmarks/probe_int8.py --instructions

--instructions instead times the kernel's instructions one at a time
(benchmarks/csrc/probe_permute.cpp: ns per instruction on one core) and records them under
"instructions" in the same JSON, one entry per CPU model, leaving its rows as they are.

Each configuration (shape, K, tokens, threads, codes hot in cache or rotated through
copies of the layer spanning --rotate-mb) is one process; all configurations run in turn,
--rounds times (a slow spell of a shared machine hits all alike), and each row keeps the
minimum over rounds of the per-call minimum (`us_min`) and the median of the per-round
medians (`us_median`). Copy bandwidth: memcpy of 2 x 512 MiB buffers, 2 threads (counted
as bytes read + bytes written, like `bench_decode.copy_bandwidth_gbps`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "benchmarks" / "csrc" / "probe_int8_lookup.cpp"
INSTR_SRC = ROOT / "benchmarks" / "csrc" / "probe_permute.cpp"
OUT = ROOT / "benchmarks" / "results" / "cpu-int8-probe.json"
SHAPES = [(4096, 4096), (14336, 4096), (576, 576), (1536, 576), (576, 1536)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rotate-mb", type=int, default=1024, help="bytes of layer copies the cold rows cycle through")
    ap.add_argument("--quick", action="store_true", help="only the Llama-3-8B shapes, K=256")
    ap.add_argument("--instructions", action="store_true", help="time single instructions instead (see above)")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    exe = Path(tempfile.mkdtemp()) / "probe"
    cxx = os.environ.get("CXX") or shutil.which("c++") or "g++"
    if a.instructions:
        return instructions(cxx, exe, Path(a.out))
    subprocess.run([cxx, "-O3", "-march=native", "-fopenmp", str(SRC), "-o", str(exe)], check=True)

    configs = []
    for out, inn in SHAPES[:2] if a.quick else SHAPES:
        big = out * inn >= 4096 * 4096
        for K in (256, 64) if big and not a.quick else (256,):
            for T in (1, 16):
                for threads in (1, 2) if big and T == 1 else (2,):
                    copies = max(2, (a.rotate_mb << 20) // (out * inn // 2))
                    for cold in (False, True):
                        for ablk in (4, 16) if (big and T == 1 and K == 256) else (4,):
                            configs.append((out, inn, K, T, threads, copies if cold else 1, ablk))
    print(f"{len(configs)} configurations x {a.rounds} rounds", flush=True)
    runs: dict = {c: [] for c in configs}
    for _ in range(a.rounds):
        for c in configs:
            out, inn, K, T, threads, copies, ablk = c
            reps = max(3, 400 // copies) if copies > 1 else 200
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            r = subprocess.run([str(exe), str(out), str(inn), str(K), str(T), str(copies), str(reps), str(ablk)],
                               capture_output=True, text=True, env=env, check=True)
            runs[c].append(json.loads(r.stdout.splitlines()[0]))
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PROBE_COPY_BYTES": str(512 << 20)}
    copy = max(json.loads(subprocess.run([str(exe), "576", "576", "256", "1", "1", "3", "16"], capture_output=True,
                                         text=True, env=env, check=True).stdout.splitlines()[1])["copy_gbps"]
               for _ in range(3))
    rows = []
    for c, rs in runs.items():
        row = dict(rs[0])
        row["us_min"] = min(r["us_min"] for r in rs)
        row["us_median"] = round(statistics.median(r["us_median"] for r in rs), 1)
        row["codes_gbps"] = round(row["code_bytes"] / row["us_min"] / 1e3, 1)
        row["read_gbps_same_buffers"] = max(r["read_gbps_same_buffers"] for r in rs)
        row["cold"] = row["copies"] > 1
        row["stream_us_at_copy_bw"] = round(row["code_bytes"] / copy / 1e3, 1)
        row["pct_of_copy_bw"] = round(100 * row["codes_gbps"] / copy, 1)
        row.pop("gcodes_s"), row.pop("check")
        rows.append(row)
        print(f"{row['out']:>5}x{row['in']:<5} K={row['K']:<3} T={row['tokens']:<2} th={row['threads']} "
              f"{'cold' if row['cold'] else 'hot '} ablk={row['ablk_subspaces']:<2} min {row['us_min']:8.1f} us "
              f"median {row['us_median']:8.1f} us  {row['codes_gbps']:5.1f} GB/s of codes "
              f"({row['pct_of_copy_bw']:.0f} % of copy)")
    res = {"what": "d=2 int8 codebook lookup GEMV (vpermi2b + vpdpbusd), benchmarks/csrc/probe_int8_lookup.cpp",
           "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
           "command": "python benchmarks/probe_int8.py " + f"--rounds {a.rounds} --rotate-mb {a.rotate_mb}"
           + (" --quick" if a.quick else ""),
           "copy_gbps_2_threads": copy, "rows": rows}
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"copy bandwidth {copy} GB/s; wrote {a.out}")
    return 0


def instructions(cxx: str, exe: Path, out: Path) -> int:
    """Compile and run probe_permute.cpp; its rows go under "instructions" in `out`."""
    subprocess.run([cxx, "-O2", "-march=native", str(INSTR_SRC), "-o", str(exe)], check=True)
    rows = [json.loads(line) for line in subprocess.run([str(exe)], capture_output=True, text=True,
                                                         check=True).stdout.splitlines()]
    for r in rows:
        print(f"{r['instr']:<10} {r['ns']:.3f} ns")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_decode import cpu_name  # /proc/cpuinfo's model name (imported here: it loads torch)

    res = json.loads(out.read_text()) if out.is_file() else {}
    # keyed by CPU model: the same instruction costs differ by vendor (a vpermi2b is three
    # uops on Intel, one on AMD's Zen 4), and the kernel's lookup default follows them
    runs = res.get("instructions", {})
    if "rows" in runs:  # the first record, from before the key: an Intel Xeon VM
        runs = {"Intel Xeon (2-core VM)": runs}
    runs[cpu_name()] = {"what": "ns per instruction, one core, 8 independent chains "
                               "(benchmarks/csrc/probe_permute.cpp)", "date": time.strftime("%Y-%m-%d"),
                       "command": "python benchmarks/probe_int8.py --instructions", "rows": rows}
    res["instructions"] = runs
    out.with_suffix(".tmp").write_text(json.dumps(res, indent=1))
    out.with_suffix(".tmp").replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
