#!/usr/bin/env bash
# Idempotent set-up of the side venv .venv-ls: a real Label Studio server (and its label-studio-sdk) for the
# review loop's round-trip tests (tests/review/test_labelstudio_roundtrip.py). Label Studio pins older
# redis / celery than the project, so it never shares the main venv:
#
#   bash scripts/setup-label-studio.sh      # creates or syncs .venv-ls from requirements/label-studio.txt
#
# The venv is synced exactly to the hash-checked lock (requirements/label-studio.txt, compiled from
# requirements/label-studio.in, command in that file); a second run finds it in sync and returns in about a
# second. uv: $UV, else the project's pinned one (.venv-uv/bin/uv, scripts/setup.sh), else `uv` on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${SLIP_LS_VENV:-.venv-ls}
UV=${UV:-}
if [ -z "$UV" ]; then
  if [ -x "${SLIP_UV_HOME:-.venv-uv}/bin/uv" ]; then UV="${SLIP_UV_HOME:-.venv-uv}/bin/uv"; else UV=uv; fi
fi
t0=$(date +%s)
[ -x "$VENV/bin/python" ] || "$UV" venv -q --python "$PY" "$VENV"
"$UV" pip sync -q --compile-bytecode --python "$VENV/bin/python" --require-hashes requirements/label-studio.txt
"$VENV/bin/python" -c "import label_studio, label_studio_sdk" \
  || { echo "setup-label-studio: $VENV does not import label_studio" >&2; exit 1; }
echo "setup-label-studio: ready in $(( $(date +%s) - t0 )) s ($VENV from requirements/label-studio.txt)"
