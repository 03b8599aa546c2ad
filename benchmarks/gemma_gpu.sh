#!/usr/bin/env bash
# How benchmarks/results/gemma3-270m/*_gpu.json were produced on a lent GPU machine (no package index, 64 MiB a
# call). Here: `python benchmarks/gemma_quality.py pack --out P`, then one tar of P (as packed/, tokenizer.json
# gzipped), the gguf and threadpoolctl wheels (whl/) and the all-layer profile (profile/), cut into pieces that
# ride along with the MLX-CUDA loads (../shared/tools/gpu/README.md) and the next calls; each call copies its
# piece to ~/gstage. The last call carries the code and runs: bash benchmarks/gemma_gpu.sh "$OUT".
set -euo pipefail
out=$1
stage=${STAGE:-$HOME/gstage}
[ -d "$stage/packed" ] || cat "$stage"/p* | tar -x -C "$stage"
[ -f "$stage/packed/tokenizer.json" ] || gunzip -k "$stage/packed/tokenizer.json.gz"
python3 -m pip install -q --no-deps --no-index "$stage"/whl/*.whl
mkdir -p "$out" /tmp/gq/kvshard && ln -sfn "$PWD/quant" /tmp/gq/kvshard/quant
export PYTHONPATH=/tmp/gq PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/gpu.txt" || true
python3 benchmarks/gemma_quality.py run --packed "$stage/packed" --profile "$stage/profile" --out "$out" ${GQ_ARGS:-} \
  2>&1 | tee "$out/run.log"
