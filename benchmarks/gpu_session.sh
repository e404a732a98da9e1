#!/usr/bin/env bash
# One script per GPU session (issues 11 and 13). Results under $OUT (or ./out).
#   STEPS=12 (default): install, check the CUDA C++ GEMV against the reference, then time it
#                       beside the Triton paths and cuBLAS: about 10 minutes on an H100/H200
#   STEPS=3:            quantization speed: one Llama-3-8B-shaped layer per step, then the whole
#                       8B shape streamed (a second call: about 10 minutes)
set -uo pipefail
OUT=${OUT:-out}
STEPS=${STEPS:-12}
mkdir -p "$OUT"
python -m pip install -q -e '.[test,cuda]' 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
if [[ $STEPS == *1* ]]; then  # correctness of the CUDA GEMV (compiles every variant for this GPU first)
  timeout 300 python -m pytest -q -m gpu tests/test_cuda_gemv.py 2>&1 | tail -30 | tee "$OUT/test_cuda_gemv.txt"
fi
if [[ $STEPS == *2* ]]; then  # decode timings: 1 and 4 tokens, the Llama-3-8B shapes, three configs
  timeout 420 python benchmarks/bench_kernels.py --check --reps 10 --tokens 1,4 --dk 2:256,2:64,4:4096 \
      --out "$OUT/kernels.json" 2>&1 | tail -60 | tee "$OUT/bench.txt"
fi
if [[ $STEPS == *3* ]]; then  # issue 13: seconds per quantization step, then 32 layers streamed (16 GB)
  timeout 120 python benchmarks/bench_kmeans.py --shapes llama3-8b --device cuda --reps 2 \
      --out "$OUT/kmeans-cuda.json" 2>&1 | tail -5 | tee "$OUT/kmeans.txt"
  timeout 420 python benchmarks/bench_stream.py --layers 32 --device cuda --out "$OUT/stream-cuda.json" \
      2>&1 | tail -5 | tee "$OUT/stream.txt"
fi
