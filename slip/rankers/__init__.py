"""Rankers: dual encoders that embed image crops and text prompts into one space."""

from slip.rankers.base import Ranker
from slip.rankers.hf_clip import HFClipRanker, build_tiny_clip, load_hf_clip, save_hf_clip
from slip.rankers.loading import DEFAULT_CLIP, load_ranker

__all__ = [
    "DEFAULT_CLIP",
    "HFClipRanker",
    "Ranker",
    "build_tiny_clip",
    "load_hf_clip",
    "load_ranker",
    "save_hf_clip",
]
