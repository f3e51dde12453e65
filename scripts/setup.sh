#!/usr/bin/env bash
# Idempotent set-up of a fresh machine from the locks in requirements/ (nothing is resolved here):
#
#   bash scripts/setup.sh          # everything the tests need (what scripts/test.sh and CI run)
#   bash scripts/setup.sh demo     # only what the demo needs (no browser, no docker-compose)
#
# 1. Debian packages: redis-server (the broker); for the tests also docker-compose (validates
#    docker-compose.yml) and chromium (renders the gallery, report and dashboard pages in their tests).
# 2. uv (pinned, hash-checked, requirements/uv.txt) into .venv-uv/, then the venv .venv synced exactly to
#    requirements/dev.txt (hash-checked) and the project installed editable on top; for the tests also the
#    Label Studio venv .venv-ls (scripts/setup-label-studio.sh, requirements/label-studio.txt). torch comes from
#    $SLIP_FIND_LINKS (default /opt/pypi-more/files, where this kind of machine keeps the pinned wheels)
#    when that folder exists, else from PyPI: the hashes are the same.
# 3. Redis at 127.0.0.1:6379, started here if nothing answers.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=${1:-test}
PY=${PYTHON:-python3}
VENV=${SLIP_VENV:-.venv}
UV_HOME=${SLIP_UV_HOME:-.venv-uv}
FIND_LINKS=${SLIP_FIND_LINKS:-/opt/pypi-more/files}
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
t0=$(date +%s)

# 1. Debian packages
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
if [ "$MODE" != demo ]; then
  command -v docker-compose >/dev/null || missing+=(docker-compose)
  command -v chromium >/dev/null || missing+=(chromium)
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# 2. Python, from the locks
if [ ! -x "$UV_HOME/bin/uv" ]; then
  "$PY" -m pip install -q --disable-pip-version-check --require-hashes --no-deps --target "$UV_HOME" \
      -r requirements/uv.txt 2>&1 | grep -v -e "is ignored" -e "Running pip as" || true
fi
UV="$UV_HOME/bin/uv"
[ -x "$VENV/bin/python" ] || "$UV" venv -q --python "$PY" "$VENV"
links=(); [ -d "$FIND_LINKS" ] && links=(--find-links "$FIND_LINKS")
# --compile-bytecode: Python reads .pyc files even where PYTHONDONTWRITEBYTECODE=1 stops it writing them (as on
# CI machines): without them every process compiles torch's and transformers' imports again (~7 s per start)
SAM2_BUILD_CUDA=0 "$UV" pip sync -q --compile-bytecode --python "$VENV/bin/python" --require-hashes "${links[@]}" \
    --build-constraint requirements/torch.txt requirements/dev.txt
"$UV" pip install -q --python "$VENV/bin/python" --no-deps -e .
"$VENV/bin/python" -c "import slip, jobs, worker, producer" || { echo "setup: the project does not import" >&2; exit 1; }
# the tests' Label Studio server lives in its own locked venv (it pins older redis / celery than ours)
[ "$MODE" = demo ] || UV="$UV" bash scripts/setup-label-studio.sh

# 3. Redis at 127.0.0.1:6379
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "setup: starting redis-server on 127.0.0.1:6379"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  for _ in $(seq 1 50); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null || { echo "setup: Redis does not answer on 127.0.0.1:6379" >&2; exit 1; }
echo "setup: ready in $(( $(date +%s) - t0 )) s ($VENV from requirements/dev.txt, Redis at 127.0.0.1:6379)"
