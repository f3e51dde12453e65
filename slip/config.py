"""One typed configuration for a whole SLIP pipeline, and the builder that loads its models.

>>> config = SlipConfig.of(sam="vit_b", clip="openai/clip-vit-base-patch32", instances="all")
>>> pipeline = build_slip(config)

A config is two declared halves, nothing of its own: :class:`slip.settings.ModelSettings` (which models,
where, how: the ``SLIP_*`` settings) and :class:`slip.options.SegmentOptions` (what each request asks).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from slip.options import SegmentOptions
from slip.settings import ModelSettings


@dataclass(frozen=True)
class SlipConfig:
    """Everything needed to build a :class:`slip.SLIP`."""

    models: ModelSettings = ModelSettings()  # models, device, dtype, cache, batch sizes
    options: SegmentOptions = SegmentOptions()  # the request's options (None fields: the models' recommendations)

    @staticmethod
    def of(**values: Any) -> "SlipConfig":
        """A config from flat keyword values, each routed to the half that declares it
        (``SlipConfig.of(sam="synth", device="cpu", points_per_side=8)``); ConfigError for an unknown name."""
        model_names = {f.name for f in fields(ModelSettings)}
        models = {k: v for k, v in values.items() if k in model_names}
        options = {k: v for k, v in values.items() if k not in model_names}
        return SlipConfig(models=ModelSettings(**models), options=SegmentOptions.parse(options))

    def to_json(self) -> dict:
        return {"models": self.models.to_json(), "options": self.options.model_dump(mode="json")}


def build_slip(config: SlipConfig):
    """Load both models once, resolve the request against them (:func:`slip.request.resolve`) and assemble
    the pipeline (a :class:`slip.SLIP`)."""
    from slip.pipeline import SLIP
    from slip.rankers.loading import load_ranker_bundle
    from slip.request import resolve
    from slip.sam import load_sam_bundle

    m = config.models
    sam = load_sam_bundle(m.sam, device=m.device, cache_dir=m.cache_dir)
    ranker = load_ranker_bundle(m.clip, device=m.device, dtype=m.dtype, cache_dir=m.cache_dir)
    request = resolve(config.options, sam=sam.ref, sam_generator=sam.generator, sam_filters=sam.filters,
                      ranker=ranker.ref, ranker_threshold=ranker.threshold, dtype=m.dtype)
    return SLIP.build(sam.model, ranker.ranker, request, points_per_batch=m.points_per_batch,
                      batch_size=m.batch_size)
