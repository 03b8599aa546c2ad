#!/usr/bin/env bash
# This session's device call 2 (after call 1 copied the tree to ~/wt-gpu and the first wheel load): install, the GPU
# tests of this tree, the merge kernels beside main's (kernel_ab.py), then the decode benchmark (decode_speed.py).
# Run from the device's checkout of main: bash ~/wt-gpu/benchmarks/gpu_series.sh "$OUT"
# On 2026-12-02 the tests took longer than their 250 s here (55 of 64 had passed; results/gpu_tests_fdd4db5.log):
# give them more time, or a call of their own.
set -uo pipefail
out=$1
main=$PWD
bash .gpu/b/install.sh 2>&1 | tail -n 2
cd ~/wt-gpu
mkdir -p /tmp/pp/kvshard && ln -sfn "$PWD/quant" /tmp/pp/kvshard/quant
export PYTHONPATH=/tmp/pp PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
git_head=$(cat HEAD_COMMIT 2>/dev/null || echo unknown)
echo "tree $git_head"
timeout 250 python3 -m pytest -q -p no:cacheprovider --noconftest -rfE tests/test_kernels.py tests/test_batch_arena.py \
  -k "gpu and not emulator or arena" > "$out/gpu_tests.log" 2>&1
tail -n 4 "$out/gpu_tests.log"
(cd benchmarks && timeout 45 python3 kernel_ab.py --against "$main/quant/kernels/src" --out "$out" --repeats 100 \
  --rounds 5) 2>&1 | tail -n 8
timeout 215 python3 benchmarks/decode_speed.py --only decode --out "$out" --rounds 7 --steps 32 \
  --series "KVCache fp16" "turboquant_mse k4/v4" "turboquant_mse k2/v2" recommended 2>&1 | tail -n 6
