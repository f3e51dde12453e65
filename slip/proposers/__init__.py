"""Proposers: an image in, filtered segment proposals out (SAM 1, SAM 2 / 2.1, EdgeTAM, the SAM 3 tracker; SAM 3
through slip.engines).

Names are re-exported lazily (PEP 562), so importing the package does not load the sam2 package or Hydra.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MaskSource": "slip.proposers.base",
    "Proposer": "slip.proposers.base",
    "proposal_records": "slip.proposers.base",
    "ProposerModel": "slip.proposers.loading",
    "load_proposer_model": "slip.proposers.loading",
    "mask_generator_for": "slip.proposers.loading",
    "Sam2MaskGenerator": "slip.proposers.sam2_generator",
    "HfTrackerMaskGenerator": "slip.proposers.hf_tracker_generator",
    "build_tiny_tracker": "slip.proposers.hf_trackers",
    "SAM2_ARCHS": "slip.proposers.sam2_model",
    "build_tiny_sam2": "slip.proposers.sam2_model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'slip.proposers' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
