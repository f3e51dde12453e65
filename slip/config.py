"""One typed configuration for a whole SLIP pipeline (or another engine), and the builder that loads its models.

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
    """Load the models once, resolve the request against them (:func:`slip.request.resolve`) and assemble the
    engine the settings name (:func:`slip.engines.build.build_engine`: ``slip``, SAM + ranker, is a
    :class:`slip.SLIP`; ``sam3`` and ``sam3-rank`` use SAM 3)."""
    from slip.engines.build import build_engine

    return build_engine(config.models, config.options)
