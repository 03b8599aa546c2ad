#!/usr/bin/env bash
# How benchmarks/results/batching_gpu.json and batch_arena_gpu_tests.log were produced on a lent GPU machine
# (../shared/tools/gpu/README.md: MLX-CUDA in two loads; grpcio and numpy are in its image, prometheus_client's
# wheel rides along under wheels/). The package is imported through a kvshard/ folder of symlinks (nothing built).
# One call, after the loads:  bash benchmarks/batching_gpu.sh "$OUT"
set -uo pipefail
out=$1
mkdir -p "$out" /tmp/bp/kvshard
python3 -m pip install -q --no-deps --no-index wheels/*.whl
for part in quant service wire client; do ln -sfn "$PWD/$part" /tmp/bp/kvshard/$part; done
export PYTHONPATH=/tmp/bp:$PWD/tests PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/gpu.txt" || true
# The arena's tests on CUDA (the committed log: c9a0fb2, whose change to quant/cache.py's _defer_append was reverted
# after this run; its two failures are the open encode/append mismatch).
timeout "${TESTS_S:-70}" python3 -m pytest -q -p no:cacheprovider --noconftest tests/test_batch_arena.py 2>&1 \
  | tail -n 30 > "$out/batch_arena_gpu_tests.log"
tail -n 3 "$out/batch_arena_gpu_tests.log"
timeout "${BENCH_S:-120}" python3 benchmarks/batching.py --mode inprocess --streams 1 8 32 --tokens 32 --out "$out" 2>&1 \
  | tail -n 20
