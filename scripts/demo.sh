#!/usr/bin/env bash
# The main job: set up everything, then run the full distributed pipeline on generated images
# (a Celery worker against Redis, a submitted batch, progress, results and an HTML gallery).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
exec .venv/bin/slip demo --out "${DEMO_OUT:-demo-out}" "$@"
