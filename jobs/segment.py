"""The segment kind's spec: the prompts, the engine, the models and the options shared by every image of a job.

The options are :class:`slip.options.SegmentOptions` (the one declaration), stored as its JSON and read
back with it; a manifest written before the options moved (its ``params``) or before engines (no ``engine``:
``slip``) reads the same way. The engine and its SAM are what a worker must serve; the ranker (``clip``) is
loaded by the worker on demand (:mod:`jobs.rankers` for the specs a job may hold).
"""

from __future__ import annotations

from typing import Optional

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from slip.errors import ConfigError, PromptError
from slip.options import SegmentOptions

MAX_PROMPTS = 32  # prompts per request
MAX_PROMPT_CHARS = 300  # slip.pipeline.MAX_PROMPT_CHARS


class SegmentSpec(BaseModel):
    """Prompts, models and options shared by every image of a segment job (its manifest's ``spec``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompts: tuple[str, ...] = Field(min_length=1)
    engine: str = "slip"  # how prompts become masks (slip.engines.build.ENGINES): a worker must serve it
    sam: str = Field(min_length=1)  # SAM spec the result must come from (SAM 1 / 2; SAM 3 for the sam3 engines)
    clip: Optional[str] = Field(None, min_length=1)  # ranker spec (jobs.rankers); None for the sam3 engine
    options: SegmentOptions = Field(SegmentOptions(), validation_alias=AliasChoices("options", "params"))
    keep_features: bool = False  # sam3: store every image's vision features (fp16) for later prompts

    @model_validator(mode="before")
    @classmethod
    def _no_ranker_for_sam3(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("engine") == "sam3" and data.get("clip") is not None:
            raise ConfigError("--clip: the sam3 engine answers with SAM 3's own scores and uses no ranker (use "
                              "--engine sam3-rank to rank SAM 3's proposals)")
        return data

    @field_validator("prompts", mode="before")
    @classmethod
    def _prompts(cls, value: object) -> tuple[str, ...]:
        return clean_prompts(value)

    @model_validator(mode="after")
    def _one_threshold_per_prompt(self) -> "SegmentSpec":
        from slip.engines.build import check_engine, check_engine_sam  # imports no model code

        check_engine(self.engine, self.options)
        check_engine_sam(self.engine, self.sam)
        if self.engine != "sam3" and self.clip is None:
            raise ConfigError(f"the {self.engine} engine ranks with a ranker: name one (--clip / SLIP_CLIP)")
        if self.keep_features and self.engine != "sam3":
            raise ConfigError(f"--keep-features keeps SAM 3's vision features (--engine sam3); the {self.engine} "
                              f"engine keeps its proposals and embeddings anyway")
        self.options.check_prompts(len(self.prompts))
        return self


def clean_prompts(value: object) -> tuple[str, ...]:
    """Prompts stripped; PromptError when none, more than MAX_PROMPTS, blank or too long."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise PromptError(f"prompts must be a list of strings, got {type(value).__name__}")
    if not value:
        raise PromptError("no prompts given: pass at least one text prompt")
    if len(value) > MAX_PROMPTS:
        raise PromptError(f"{len(value)} prompts given; a request takes at most {MAX_PROMPTS}: split them into several jobs")
    cleaned = []
    for i, prompt in enumerate(value):
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError(f"prompt {i} is empty or blank: give a short description such as 'a red car'")
        if len(prompt.strip()) > MAX_PROMPT_CHARS:
            raise PromptError(f"prompt {i} has {len(prompt.strip())} characters (limit {MAX_PROMPT_CHARS})")
        cleaned.append(prompt.strip())
    return tuple(cleaned)
