"""One typed configuration for a whole SLIP pipeline, and the builder that loads its models."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from slip.crops import CropConfig
from slip.filters import parse_filters
from slip.generator import MaskGenerator
from slip.pipeline import SLIP
from slip.rankers.loading import DEFAULT_CLIP, load_ranker
from slip.sam import load_sam, recommended_filters, recommended_generator_params, resolve_filters


@dataclass(frozen=True)
class SlipConfig:
    """Everything needed to build a :class:`slip.SLIP`; spec strings as in ``slip segment``."""

    sam: str = "vit_b"  # SAM spec: vit_h | vit_l | vit_b | synth | tiny-random | PATH
    clip: str = DEFAULT_CLIP  # ranker spec: HF hub id | DIR | synth | tiny-random
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "fp32"  # fp32 | fp16 | bf16 (half precisions on GPU only)
    cache_dir: Path | None = None  # weights cache ($SLIP_CACHE); None = ~/.cache/slip
    generator: dict = field(default_factory=dict)  # MaskGenerator keyword overrides; they win over the
    # checkpoint's generator.json, which wins over SAM's defaults
    filters: str | None = None  # filter chain, e.g. "containment:0.8,min_area:50,disjoint"; None = the
    # checkpoint's filters.json chain, else the paper's "containment"
    crop: CropConfig = CropConfig()  # how segments are cropped for the ranker
    top_k: int = 5  # candidates listed per prompt
    threshold: float | None = None  # below this similarity a prompt gets "no match"
    one_to_one: bool = False  # Hungarian assignment: two prompts never share a segment
    batch_size: int = 64  # crops per ranker forward pass

    def to_json(self) -> dict:
        data = asdict(self)
        data["cache_dir"] = None if self.cache_dir is None else str(self.cache_dir)
        data["crop"] = asdict(self.crop)
        return data


def build_slip(config: SlipConfig) -> SLIP:
    """Load both models once and assemble the pipeline; generator options are SAM's defaults, overridden
    by the checkpoint's generator.json, overridden by ``config.generator``; the filter chain is the paper's
    ``containment``, overridden by the checkpoint's filters.json, overridden by ``config.filters``."""
    recommended = recommended_generator_params(config.sam, cache_dir=config.cache_dir)
    filters = resolve_filters(config.filters, recommended_filters(config.sam, cache_dir=config.cache_dir))
    sam = load_sam(config.sam, device=config.device, dtype=config.dtype, cache_dir=config.cache_dir)
    ranker = load_ranker(config.clip, device=config.device, dtype=config.dtype, cache_dir=config.cache_dir)
    return SLIP(
        MaskGenerator(sam, **{**recommended, **config.generator}),
        ranker,
        filters=parse_filters(filters),
        crop=config.crop,
        top_k=config.top_k,
        threshold=config.threshold,
        one_to_one=config.one_to_one,
        batch_size=config.batch_size,
    )
