"""One typed configuration for a whole SLIP pipeline, and the builder that loads its models."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from slip.crops import CropConfig
from slip.pipeline import SLIP
from slip.rankers.loading import DEFAULT_CLIP, load_ranker_bundle
from slip.request import CropSpec, SegmentOptions, resolve
from slip.sam import load_sam_bundle


@dataclass(frozen=True)
class SlipConfig:
    """Everything needed to build a :class:`slip.SLIP`; spec strings as in ``slip segment``."""

    sam: str = "vit_b"  # SAM spec: vit_h | vit_l | vit_b | synth | tiny-random | PATH | HF SamModel id
    clip: str = DEFAULT_CLIP  # ranker spec: HF hub id | DIR | synth | tiny-random
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "fp32"  # compute precision: fp32 | bf16 (CPU and GPU) | fp16 (GPU)
    cache_dir: Path | None = None  # weights cache ($SLIP_CACHE); None = ~/.cache/slip
    generator: dict = field(default_factory=dict)  # mask generator options given explicitly (win over generator.json)
    filters: str | None = None  # filter chain given explicitly; None = the SAM's filters.json, else "containment"
    crop: CropConfig = CropConfig()  # how segments are cropped for the ranker
    top_k: int = 5  # candidates listed per prompt
    threshold: float | tuple[float | None, ...] | None = None  # similarity threshold, one or one per prompt;
    # None = the ranker's calibrated threshold.json (when calibrated), else none
    calibrated: bool = True  # use the ranker's threshold.json when no threshold is given
    instances: str = "one"  # one: the best segment per prompt; all: every segment above the threshold
    one_to_one: bool = False  # Hungarian assignment: two prompts never share a segment
    points_per_batch: int = 64  # SAM point prompts per forward pass (speed and memory only)
    batch_size: int = 64  # crops per ranker forward pass (speed and memory only)

    def options(self) -> SegmentOptions:
        """The explicit options as a request (:func:`slip.request.resolve` fills in the rest)."""
        crop = CropSpec(background=self.crop.background, padding=self.crop.padding, square=self.crop.square)
        return SegmentOptions(generator=dict(self.generator), filters=self.filters, crop=crop, top_k=self.top_k,
                              threshold=self.threshold, calibrated=self.calibrated, instances=self.instances,
                              one_to_one=self.one_to_one)

    def to_json(self) -> dict:
        data = asdict(self)
        data["cache_dir"] = None if self.cache_dir is None else str(self.cache_dir)
        data["crop"] = asdict(self.crop)
        return data


def build_slip(config: SlipConfig) -> SLIP:
    """Load both models once, resolve the request against them (:func:`slip.request.resolve`) and assemble
    the pipeline."""
    sam = load_sam_bundle(config.sam, device=config.device, cache_dir=config.cache_dir)
    ranker = load_ranker_bundle(config.clip, device=config.device, dtype=config.dtype, cache_dir=config.cache_dir)
    request = resolve(config.options(), sam=sam.ref, sam_generator=sam.generator, sam_filters=sam.filters,
                      ranker=ranker.ref, ranker_threshold=ranker.threshold, dtype=config.dtype)
    return SLIP.build(sam.model, ranker.ranker, request, points_per_batch=config.points_per_batch,
                      batch_size=config.batch_size)
