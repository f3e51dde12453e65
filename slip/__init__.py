"""SLIP (SAM + CLIP): text-prompted object segmentation. The model library; it knows nothing of queues."""

from slip.config import SlipConfig, build_slip
from slip.crops import CropConfig, crop_segments
from slip.errors import SlipError
from slip.filters import Containment, Dedup, Disjoint, MinArea, apply_filters, default_filters, parse_filters
from slip.generator import MaskGenerator
from slip.images import load_image
from slip.pipeline import SLIP
from slip.rankers.base import Ranker
from slip.rankers.loading import load_ranker
from slip.ranking import rank
from slip.sam import load_sam
from slip.types import FilterStat, Match, MaskSet, Proposals, SlipResult

__all__ = [
    "SLIP",
    "Containment",
    "CropConfig",
    "Dedup",
    "Disjoint",
    "FilterStat",
    "MaskGenerator",
    "MaskSet",
    "Match",
    "MinArea",
    "Proposals",
    "Ranker",
    "SlipConfig",
    "SlipError",
    "SlipResult",
    "apply_filters",
    "build_slip",
    "crop_segments",
    "default_filters",
    "load_image",
    "load_ranker",
    "load_sam",
    "parse_filters",
    "rank",
]
