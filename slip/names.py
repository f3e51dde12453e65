"""The model names a spec may be besides a path or a Hugging Face id, each spelt in this one place.

A light module (no torch, nothing at import): producers check specs against it before any model loads, and
every loader takes its names from here. Which loader serves a name is the loaders' business
(:mod:`slip.sam`, :mod:`slip.proposers.loading`, :mod:`slip.engines.sam3_model`, :mod:`slip.rankers.loading`).
"""

from __future__ import annotations

SYNTH = "synth"  # the SAM and the ranker bundled with the package, trained on the synthetic world
TINY = "tiny-random"  # seeded random SAM 1 / HF CLIP built from the real classes (tests; only when named)

# SAM 1 (segment_anything) and SAM 2 / 2.1 (sam2; its names are sam2*-hiera-* and facebook/sam2* ids)
SAM1_TYPES = ("vit_h", "vit_l", "vit_b")  # the official checkpoints
TINY_SAM2 = "tiny-random-sam2"
SAM2_PREFIXES = ("sam2", "facebook/sam2")  # sam2-hiera-tiny, sam2.1-hiera-large, facebook/sam2.1-hiera-large ...

# SAM 3 itself: an engine (--engine sam3 / sam3-rank), never a proposer; gated on the hub
HUB_SAM3 = "facebook/sam3"
TINY_SAM3 = "tiny-random-sam3"
SAM3_SHORT = "sam3"
SAM3 = (SAM3_SHORT, HUB_SAM3)  # the cached snapshot of HUB_SAM3

# transformers' promptable-mask models that propose through SAM 2's point interface (slip.proposers.hf_trackers)
HUB_EDGETAM = "yonigozlan/EdgeTAM-hf"  # the transformers-format EdgeTAM transformers' docs and tests load
EDGETAM_SHORT = "edgetam"
EDGETAM = (EDGETAM_SHORT, HUB_EDGETAM)
TINY_EDGETAM = "tiny-random-edgetam"
SAM3_TRACKER_SHORT = "sam3-tracker"
SAM3_TRACKER = (SAM3_TRACKER_SHORT,)  # the tracker inside HUB_SAM3 (HUB_SAM3 itself names SAM 3's engine)
TINY_SAM3_TRACKER = "tiny-random-sam3-tracker"

# rankers
TINY_SIGLIP = "tiny-random-siglip"
RANKER_NAMES = (SYNTH, TINY, TINY_SIGLIP)  # ranker specs that are names: they win over a folder of the same name

SAM3_NAMES = (*SAM3, TINY_SAM3)  # every SAM 3 checkpoint named without a path
PROPOSER_NAMES = (*SAM1_TYPES, SYNTH, TINY, TINY_SAM2, *EDGETAM, TINY_EDGETAM, *SAM3_TRACKER, TINY_SAM3_TRACKER)
