#!/usr/bin/env bash
# How benchmarks/results/speed_*_gpu.json were produced on a lent GPU machine (no package registry there).
# Here, once: bash ../shared/tools/gpu/prep.sh   (splits the MLX-CUDA wheel into .gpu/a and .gpu/b)
# Device call 1 (carry .gpu/a):  mkdir -p ~/kvshard-gpu && cp .gpu/a/* ~/kvshard-gpu/
# Device call 2 (carry .gpu/b), right after:  bash .gpu/b/install.sh && bash benchmarks/run_gpu.sh "$OUT"
# The package is imported from the working tree through a kvshard/ namespace folder of symlinks, so nothing
# is built there. The older sections (`kvshard bench`: attention_gpu, append_gpu, decode_gpu, tune_gpu,
# overhead_gpu) ran with: python3 benchmarks/bench.py --only tune,attention,append,decode --apply-tune
# --model random --budget-ms 300 --out "$out".
set -euo pipefail
out=${1:-benchmarks/results}
mkdir -p "$out" /tmp/pp/kvshard && ln -sfn "$PWD/quant" /tmp/pp/kvshard/quant
export PYTHONPATH=/tmp/pp PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
timeout 240 python3 -m pytest -q -p no:cacheprovider --noconftest tests/test_kernels.py -k "gpu and not emulator" 2>&1 \
  | tail -n 40 > "$out/gpu_tests.log" || true
tail -n 5 "$out/gpu_tests.log"
# Device time of each kernel of 3 decode steps of a 2-layer model at 64K, per series (Nsight Compute).
if [ -n "${PROFILE:-}" ] && command -v ncu >/dev/null; then
  (cd benchmarks && for s in fp16 ours klt; do
     timeout 150 ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv --page raw \
       python3 profile_step.py --series $s > /tmp/ncu_$s.csv 2> /tmp/ncu_$s.err || tail -n 3 /tmp/ncu_$s.err
   done
   python3 profile_step.py --summarise /tmp/ncu_fp16.csv /tmp/ncu_ours.csv /tmp/ncu_klt.csv > "$out/speed_profile_gpu.json"
   head -c 3000 "$out/speed_profile_gpu.json") || true
fi
# 2026-12-01's committed run: BENCH_ARGS="--steps 24 --rounds 3 --repeats 30" (the device budget's share).
timeout "${BENCH_S:-300}" python3 benchmarks/decode_speed.py --out "$out" ${BENCH_ARGS:-}
