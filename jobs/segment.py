"""The segment kind's spec: the prompts, the models and the options shared by every image of a job.

The options are :class:`slip.options.SegmentOptions` (the one declaration), stored as its JSON and read
back with it; a manifest written before the options moved (its ``params``) reads the same way.
"""

from __future__ import annotations

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from slip.errors import PromptError
from slip.options import SegmentOptions

MAX_PROMPTS = 32  # prompts per request
MAX_PROMPT_CHARS = 300  # slip.pipeline.MAX_PROMPT_CHARS


class SegmentSpec(BaseModel):
    """Prompts, models and options shared by every image of a segment job (its manifest's ``spec``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompts: tuple[str, ...] = Field(min_length=1)
    sam: str = Field(min_length=1)  # SAM spec the result must come from
    clip: str = Field(min_length=1)  # ranker spec the result must come from
    options: SegmentOptions = Field(SegmentOptions(), validation_alias=AliasChoices("options", "params"))

    @field_validator("prompts", mode="before")
    @classmethod
    def _prompts(cls, value: object) -> tuple[str, ...]:
        return clean_prompts(value)

    @model_validator(mode="after")
    def _one_threshold_per_prompt(self) -> "SegmentSpec":
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
