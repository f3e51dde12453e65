#!/usr/bin/env bash
# Refresh the dependency locks after editing pyproject.toml's dependencies (needs PyPI; about a minute):
#
#   bash scripts/lock.sh              # re-resolve only what pyproject.toml asks for (keeps other pins)
#   bash scripts/lock.sh --upgrade    # move every package to its newest allowed release
#
# Writes requirements/dev.txt (everything: the project, the s3 extra and the dev extra; what set-up, CI and
# the tests install), requirements/runtime.txt (the project and the s3 extra: what the Dockerfile installs,
# pinned to the same versions as dev.txt), requirements/label-studio.txt (the tests' Label Studio server, a
# venv of its own: scripts/setup-label-studio.sh) and requirements/uv.txt (the installer itself). Every line carries
# its SHA-256 hashes; installs check them. torch and torchvision stay the pinned pair of
# requirements/torch.txt. tests/test_lock.py fails when pyproject.toml and the locks disagree.
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-uv}
common=(--python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes --quiet
        --override requirements/overrides.txt --build-constraint requirements/torch.txt
        --constraint requirements/torch.txt --no-header --annotation-style line)
"$UV" pip compile pyproject.toml --extra dev --extra s3 "${common[@]}" "$@" -o requirements/dev.txt
"$UV" pip compile pyproject.toml --extra s3 "${common[@]}" --constraint requirements/dev.txt -o requirements/runtime.txt
"$UV" pip compile requirements/label-studio.in --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    --generate-hashes --quiet -o requirements/label-studio.txt "$@"
"$UV" pip compile requirements/uv.in --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    --generate-hashes --quiet --no-header --annotation-style line -o requirements/uv.txt
echo "lock: requirements/dev.txt ($(grep -c '^[a-z]' requirements/dev.txt) packages)," \
     "requirements/runtime.txt ($(grep -c '^[a-z]' requirements/runtime.txt))," \
     "requirements/label-studio.txt ($(grep -c '^[a-z]' requirements/label-studio.txt)), requirements/uv.txt"
