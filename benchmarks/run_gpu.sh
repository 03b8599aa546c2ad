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
timeout "${TESTS_S:-240}" python3 -m pytest -q -p no:cacheprovider --noconftest tests/test_kernels.py -k "gpu and not emulator" 2>&1 \
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
# TUNE=1: the tensor-core kernel's launch-shape sweep (tune_mma.py), device time per launch under Nsight Compute,
# and (SECTIONS=1) Nsight's occupancy / stall sections of the default launch at 64K (Llama-3.2-1B attention shape).
if [ -n "${TUNE:-}" ] && command -v ncu >/dev/null; then
  (cd benchmarks && for run in "ours 0" "ours 1" "ours 2" "fp16 0 1 2"; do
     set -- $run; s=$1; shift; tag=${s}_$1
     timeout "${TUNE_S:-70}" ncu --clock-control none --profile-from-start off --csv --page raw \
       --metrics gpu__time_duration.sum,dram__bytes_read.sum,sm__warps_active.avg.pct_of_peak_sustained_active \
       python3 tune_mma.py --series $s --shapes "$@" --manifest /tmp/tune_$tag.json > /tmp/tune_$tag.csv \
       2> /tmp/tune_$tag.err || tail -n 5 /tmp/tune_$tag.err
   done
   python3 tune_mma.py --summarise /tmp/tune_ours_ /tmp/tune_fp16_ > "$out/tune_mma_gpu.json"
   [ -z "${SECTIONS:-}" ] || timeout 90 ncu --clock-control none --profile-from-start off --section SpeedOfLight \
     --section Occupancy --section LaunchStats --section WarpStateStats python3 profile_step.py --kernel --steps 1 \
     > "$out/tune_mma_sections_gpu.txt" 2>&1 || true
   python3 -c "import json; print(json.dumps(json.load(open('$out/tune_mma_gpu.json'))['best'], indent=0)[:4000])") || true
fi
# 2026-12-01's committed run: BENCH_ARGS="--steps 24 --rounds 3 --repeats 30" (the device budget's share).
tune=(); [ ! -s "$out/tune_mma_gpu.json" ] || tune=(--apply-tune "$out/tune_mma_gpu.json")
timeout "${BENCH_S:-300}" python3 benchmarks/decode_speed.py --out "$out" "${tune[@]}" ${BENCH_ARGS:-}
