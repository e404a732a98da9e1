#!/usr/bin/env bash
# One script per GPU session (issue 11): install, check the CUDA C++ GEMV against the
# reference, then time it beside the Triton paths and cuBLAS. Results under $OUT (or
# ./out). Budget: about 10 minutes on an H100/H200.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
python -m pip install -q -e '.[test,cuda]' 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
# 1. correctness of the CUDA GEMV (compiles every variant for this GPU first)
timeout 300 python -m pytest -q -m gpu tests/test_cuda_gemv.py 2>&1 | tail -30 | tee "$OUT/test_cuda_gemv.txt"
# 2. decode timings: 1 and 4 tokens, the four Llama-3-8B shapes, d=2 K=256 / d=2 K=64 / d=4 K=4096
timeout 420 python benchmarks/bench_kernels.py --check --reps 10 --tokens 1,4 --dk 2:256,2:64,4:4096 \
    --out "$OUT/kernels.json" 2>&1 | tail -60 | tee "$OUT/bench.txt"
