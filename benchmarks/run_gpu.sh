#!/usr/bin/env bash
# How benchmarks/results/*_gpu.* were produced on a lent GPU machine (no package registry there).
# Here, once: bash ../shared/tools/gpu/prep.sh   (splits the MLX-CUDA wheel into .gpu/a and .gpu/b)
# Device call 1 (carry .gpu/a):  mkdir -p ~/kvshard-gpu && cp .gpu/a/* ~/kvshard-gpu/
# Device call 2 (carry .gpu/b), right after:  bash .gpu/b/install.sh && bash benchmarks/run_gpu.sh "$OUT"
# The package is imported from the working tree through a kvshard/ namespace folder of symlinks, so nothing
# is built there. The decode section uses a random-weight model of SmolLM2-135M's shape: the embedded GGUF
# (98 MB) is larger than one call may carry.
set -euo pipefail
out=${1:-benchmarks/results}
mkdir -p /tmp/pp/kvshard && ln -sfn "$PWD/quant" /tmp/pp/kvshard/quant
export PYTHONPATH=/tmp/pp PYTHONUNBUFFERED=1
timeout 150 python3 -m pytest -q -p no:cacheprovider --noconftest tests/test_kernels.py -k gpu || true
timeout 40 python3 -m kvshard.quant.bench --only overhead --out "$out" || true
timeout 380 python3 -m kvshard.quant.bench --only tune,attention,append,decode --apply-tune --model random \
  --budget-ms 300 --out "$out"
