#!/usr/bin/env bash
# How benchmarks/results/batching_gpu_service.json, batching_gpu.json and batch_arena_gpu_tests.log were produced on
# a lent GPU machine (../shared/tools/gpu/README.md: MLX-CUDA in two loads). The package is imported through a
# kvshard/ folder of symlinks (nothing built). The service's wheels that the image lacks or holds older
# (grpcio, protobuf, grpcio-health-checking, grpcio-reflection, prometheus_client: `pip download --no-deps` of
# constraints.txt's versions for cp312) go into a folder of their own, first on PYTHONPATH.
#   bash benchmarks/batching_gpu.sh "$OUT" WHEEL_DIR
set -uo pipefail
out=$1
wheels=$2
mkdir -p "$out" /tmp/bp/kvshard
python3 -m pip install -q --no-deps --no-index --target /tmp/bw "$wheels"/*.whl 2>&1 | grep -v WARNING
for part in quant service wire client; do ln -sfn "$PWD/$part" /tmp/bp/kvshard/$part; done
export PYTHONPATH=/tmp/bw:/tmp/bp:$PWD/tests PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/gpu.txt" || true
# The arena's tests on CUDA; --runxfail: the strict xfail's test reports plainly whether it passes now.
timeout "${TESTS_S:-90}" python3 -m pytest -q -p no:cacheprovider --noconftest --runxfail tests/test_batch_arena.py 2>&1 \
  | tail -n 400 > "$out/batch_arena_gpu_tests.log"
tail -n 3 "$out/batch_arena_gpu_tests.log"
# Continuous batching over gRPC: kvshard serve --model random:llama-3.2-1b, 1 / 8 / 32 streams.
timeout "${BENCH_S:-200}" python3 benchmarks/batching.py --mode service --model random:llama-3.2-1b --streams 1 8 32 \
  --tokens "${TOKENS:-32}" --rounds 2 --out "$out" 2>&1 | tail -n 12
# The same arena tests without the fix (mx.depends on the last in-place launch), to see them fail without it.
rm -rf /tmp/unfixed && mkdir -p /tmp/unfixed && cp -r quant tests /tmp/unfixed/
python3 - <<'EOF'
for path, dep in (("/tmp/unfixed/quant/cache.py", "queries"), ("/tmp/unfixed/quant/batch_arena.py", "q")):
    text = open(path).read()
    open(path, "w").write(text.replace(f"mx.depends({dep}, self._written)", dep))
EOF
(mkdir -p /tmp/ub/kvshard && ln -sfn /tmp/unfixed/quant /tmp/ub/kvshard/quant && cd /tmp/unfixed \
  && PYTHONPATH=/tmp/ub timeout "${TESTS_S:-90}" python3 -m pytest -q -p no:cacheprovider --noconftest --runxfail \
     tests/test_batch_arena.py 2>&1 | tail -n 8 > "$out/batch_arena_gpu_tests_without_fix.log")
tail -n 3 "$out/batch_arena_gpu_tests_without_fix.log"
# In process: the scheduler without gRPC, and one batched step's logits against each row alone.
timeout "${INPROC_S:-100}" python3 benchmarks/batching.py --mode inprocess --streams 1 8 32 --tokens 32 --out "$out" 2>&1 \
  | tail -n 8
