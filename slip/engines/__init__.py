"""Engines: how text prompts become masks — the SLIP pipeline, SAM 3 answering, SAM 3 proposing for a ranker.

Names are re-exported lazily (PEP 562), so importing the package loads no model code.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ENGINES": "slip.engines.build",
    "Engine": "slip.engines.build",
    "build_engine": "slip.engines.build",
    "check_engine": "slip.engines.build",
    "Sam3Concepts": "slip.engines.sam3",
    "Sam3Vision": "slip.engines.sam3",
    "Sam3Engine": "slip.engines.sam3_engine",
    "Sam3Proposer": "slip.engines.sam3_engine",
    "load_sam3": "slip.engines.sam3_model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'slip.engines' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
