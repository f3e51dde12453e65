"""A ranker's calibrated "present" threshold: ``threshold.json`` beside its ``config.json``.

Written by ``slip calibrate --write`` (:mod:`slip.calibrate` picks the value), read whenever the ranker is
loaded (:func:`slip.rankers.loading.load_ranker_bundle`). This module is light (json only) so loading a
ranker does not import the calibration machinery.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from slip.errors import ConfigError

THRESHOLD_FILE = "threshold.json"
METRIC = "f1"  # what the threshold maximises


def read_threshold(directory: Path, *, ranker_sha256: str | None = None) -> float | None:
    """The calibrated threshold in ``directory/threshold.json``; None when there is no such file.

    ConfigError naming the file when it is malformed (not JSON, no numeric ``threshold`` in [-1, 1]),
    or, given ``ranker_sha256``, when the file records other weights (a stale calibration).
    """
    path = Path(directory) / THRESHOLD_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is not valid JSON ({str(e).splitlines()[0]}): re-run `slip calibrate --write` "
                          f"or delete it") from e
    value = data.get("threshold") if isinstance(data, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1.0 <= value <= 1.0:
        raise ConfigError(f"{path} must hold {{\"threshold\": <number in [-1, 1]>, ...}}, got threshold={value!r}: "
                          f"re-run `slip calibrate --write` or delete it")
    recorded = data.get("ranker_sha256")
    if ranker_sha256 is not None and recorded is not None and recorded != ranker_sha256:
        raise ConfigError(f"{path} was calibrated for other weights (sha256 {recorded[:12]}..., these are "
                          f"{ranker_sha256[:12]}...): re-run `slip calibrate --write` or delete it")
    return float(value)


def write_threshold(directory: Path, record: dict) -> Path:
    """Write ``record`` (with a ``threshold`` in [-1, 1] and ``metric``) as ``directory/threshold.json``."""
    value = record.get("threshold")
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not -1.0 <= value <= 1.0:
        raise ConfigError(f"a threshold must be a number in [-1, 1], got {value!r}")
    path = Path(directory) / THRESHOLD_FILE
    try:
        path.write_text(json.dumps({"threshold": float(value), "metric": METRIC, **record}, indent=2) + "\n")
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e}") from e
    return path
