"""SLIP (SAM + CLIP): text-prompted object segmentation. The model library; it knows nothing of queues.

Names are re-exported lazily (PEP 562), so ``import slip.errors`` or a light CLI command does not pay
for importing torch, transformers and timm.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SlipConfig": "slip.config",
    "ModelSettings": "slip.settings",
    "SegmentOptions": "slip.options",
    "build_slip": "slip.config",
    "CropConfig": "slip.crops",
    "crop_segments": "slip.crops",
    "SlipError": "slip.errors",
    "Containment": "slip.filters",
    "Dedup": "slip.filters",
    "Disjoint": "slip.filters",
    "MinArea": "slip.filters",
    "apply_filters": "slip.filters",
    "default_filters": "slip.filters",
    "parse_filters": "slip.filters",
    "MaskGenerator": "slip.generator",
    "build_engine": "slip.engines.build",
    "load_proposer_model": "slip.proposers.loading",
    "Sam2MaskGenerator": "slip.proposers.sam2_generator",
    "load_image": "slip.images",
    "SLIP": "slip.pipeline",
    "Ranker": "slip.rankers.base",
    "load_ranker": "slip.rankers.loading",
    "rank": "slip.ranking",
    "load_sam": "slip.sam",
    "FilterStat": "slip.types",
    "Match": "slip.types",
    "MaskSet": "slip.types",
    "Proposals": "slip.types",
    "SlipResult": "slip.types",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'slip' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
