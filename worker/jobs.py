"""Job payloads (pydantic): what a producer sends, what a task records, what the ledger holds.

Everything here travels as JSON (Celery is configured for JSON only) and stays small: image bytes,
masks and embeddings live in the object store and only their keys appear in these records. A job's
images are cut into *chunks* of ``batch_size`` consecutive items; chunk ``c`` holds items
``[c * batch_size, (c + 1) * batch_size)`` and is what one ``slip.segment`` task processes.
"""

from __future__ import annotations

import math
import re
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slip.errors import ConfigError, InputError, PromptError
from slip.request import CropSpec, SegmentOptions

MAX_PROMPTS = 32  # prompts per request
MAX_ITEMS_PER_TASK = 64  # K, images per segment task
PAGE_ITEMS = 1024  # about this many items per manifest page (a multiple of the batch size)
MAX_PIXELS = 64_000_000  # slip.images.DEFAULT_MAX_PIXELS (kept here: payloads import no model code)
MAX_PROMPT_CHARS = 300  # slip.pipeline.MAX_PROMPT_CHARS
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
GENERATOR_FIELDS = ("points_per_side", "pred_iou_thresh", "stability_score_thresh", "box_nms_thresh")
Threshold = Union[float, list[Optional[float]], None]


class SegmentParams(BaseModel):
    """A segment request's options as given (None = resolved by the worker against its models'
    recommendations: :func:`slip.request.resolve`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    points_per_side: Optional[int] = Field(None, ge=1, le=256)  # SAM point grid side; SAM default 32
    pred_iou_thresh: Optional[float] = Field(None, ge=0.0, le=1.0)  # SAM predicted-IoU threshold; default 0.88
    stability_score_thresh: Optional[float] = Field(None, ge=0.0, le=1.0)  # SAM stability threshold; default 0.95
    box_nms_thresh: Optional[float] = Field(None, ge=0.0, le=1.0)  # SAM box NMS IoU (1.0 = no NMS); default 0.7
    filters: Optional[str] = None  # filter chain; None = the worker SAM's filters.json chain, else "containment"
    crop_background: Literal["black", "gray", "blur", "none"] = "black"  # segment crop background
    crop_padding: float = Field(0.0, ge=0.0, le=2.0)  # crop padding, fraction of the box side
    square: bool = True  # pad crops to a square before resizing
    top_k: int = Field(5, ge=0, le=100)  # candidates listed per prompt
    threshold: Threshold = None  # similarity threshold, one or one per prompt; None = the ranker's calibrated one
    calibrated: bool = True  # use the ranker's threshold.json when no threshold is given
    instances: Literal["one", "all"] = "one"  # one: the best segment per prompt; all: every one above the threshold
    one_to_one: bool = False  # Hungarian assignment: prompts never share a segment
    render: bool = False  # also write mask_<i>.png and overlay_<i>.png (else segments.json alone)
    max_pixels: int = Field(MAX_PIXELS, ge=1)  # refuse larger images

    @field_validator("filters")
    @classmethod
    def _filters(cls, value: Optional[str]) -> Optional[str]:
        """A bad chain is refused when the job is built (producer side), not first by a worker."""
        if value is not None:
            from slip.request import canonical_filters

            try:
                canonical_filters(value)
            except ConfigError as e:
                raise ValueError(str(e)) from e
        return value

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, value: Threshold) -> Threshold:
        values = value if isinstance(value, list) else [value]
        if any(v is not None and not -1.0 <= v <= 1.0 for v in values):
            raise ValueError(f"threshold {value!r} is not a cosine similarity in [-1, 1]")
        return value

    def to_options(self) -> SegmentOptions:
        """The request as :func:`slip.request.resolve` takes it (explicit options only)."""
        generator = {name: getattr(self, name) for name in GENERATOR_FIELDS if getattr(self, name) is not None}
        threshold = tuple(self.threshold) if isinstance(self.threshold, list) else self.threshold
        return SegmentOptions(
            generator=generator, filters=self.filters,
            crop=CropSpec(background=self.crop_background, padding=self.crop_padding, square=self.square),
            top_k=self.top_k, threshold=threshold, calibrated=self.calibrated, instances=self.instances,
            one_to_one=self.one_to_one,
        )


class Item(BaseModel):
    """One image of a job."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int = Field(ge=0)  # position in the job's manifest
    image_key: str  # inputs/<sha256>.<ext>
    image_sha: str = Field(pattern=r"^[0-9a-f]{64}$")  # sha256 of the image bytes
    name: str = ""  # path relative to the submitted root, "/"-separated (for exports and reports)

    @field_validator("image_key")
    @classmethod
    def _key(cls, value: str) -> str:
        from worker.store import validate_key

        validate_key(value)
        if not value.startswith("inputs/"):
            raise ValueError(f"image key {value!r} is not under inputs/")
        return value


class SegmentSpec(BaseModel):
    """Prompts, models and options shared by every item of a job."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompts: tuple[str, ...] = Field(min_length=1)
    sam: str = Field(min_length=1)  # SAM spec the result must come from
    clip: str = Field(min_length=1)  # ranker spec the result must come from
    params: SegmentParams = SegmentParams()

    @field_validator("prompts", mode="before")
    @classmethod
    def _prompts(cls, value: object) -> tuple[str, ...]:
        return clean_prompts(value)

    @model_validator(mode="after")
    def _one_threshold_per_prompt(self) -> "SegmentSpec":
        thresholds = self.params.threshold
        if isinstance(thresholds, list) and len(thresholds) != len(self.prompts):
            raise ConfigError(f"{len(thresholds)} thresholds for {len(self.prompts)} prompts: give one value, or one "
                              f"per prompt")
        return self


class SegmentRequest(BaseModel):
    """The argument of one ``slip.segment`` task: one chunk of a job."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str = Field(pattern=JOB_ID.pattern)
    chunk: int = Field(ge=0)  # which chunk of the job
    items: tuple[Item, ...] = Field(min_length=1, max_length=MAX_ITEMS_PER_TASK)
    spec: SegmentSpec
    points_per_batch: Optional[int] = Field(None, ge=1)  # runtime override (speed and memory only)

    @staticmethod
    def parse(data: object) -> "SegmentRequest":
        """Validate a task payload; ValidationError becomes an InputError subclass."""
        return parse_model(SegmentRequest, data)


class JobManifest(BaseModel):
    """A job's header, ``jobs/<job id>/manifest.json``; its items are in pages beside it."""

    job_id: str = Field(pattern=JOB_ID.pattern)
    kind: Literal["segment"] = "segment"
    format_version: int = 2
    created: str  # ISO 8601 UTC
    spec: SegmentSpec
    batch_size: int = Field(ge=1, le=MAX_ITEMS_PER_TASK)  # K, images per task (chunk)
    total: int = Field(ge=1)  # images in the job
    page_size: int = Field(ge=1)  # items per manifest page (a multiple of batch_size)
    root: str = ""  # the submitted root on the producer's machine, for people only

    @property
    def chunks(self) -> int:
        return math.ceil(self.total / self.batch_size)

    def chunk_range(self, chunk: int) -> range:
        """Item indices of ``chunk``."""
        start = chunk * self.batch_size
        return range(start, min(start + self.batch_size, self.total))

    def page_of(self, index: int) -> int:
        return index // self.page_size

    @staticmethod
    def page_size_for(batch_size: int) -> int:
        return batch_size * max(1, PAGE_ITEMS // batch_size)


class ItemOutcome(BaseModel):
    """How one image of a chunk ended (inside a chunk's completion record)."""

    index: int
    state: Literal["done", "failed"]
    result_key: str = ""  # results/<image sha>/<result digest>: where its files are
    how: Literal["computed", "cached", "existing", "none"] = "none"  # proposals computed / cached / result existed
    permanent: bool = False  # failed: a retry of the same request cannot help
    reason: Optional[str] = None  # failed: why, one line
    error: Optional[str] = None  # failed: the error class, for people
    found: list[int] = []  # done: instances found per prompt
    timings_s: dict[str, float] = {}  # stage -> seconds

    @property
    def letter(self) -> str:
        """``d`` done, ``p`` failed for good, ``t`` failed for now (a later attempt may succeed)."""
        return "d" if self.state == "done" else ("p" if self.permanent else "t")


class ChunkRecord(BaseModel):
    """A chunk's completion record, ``jobs/<job>/done/c<chunk>-<letters>.json`` (the letters, one per item,
    let status count states from a listing alone)."""

    job_id: str
    chunk: int
    task_id: str
    worker: str
    finished: str  # ISO 8601 UTC
    items: list[ItemOutcome]

    @property
    def letters(self) -> str:
        return "".join(item.letter for item in self.items)


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


def parse_model(model: type[BaseModel], data: object):
    """``model.model_validate(data)`` with pydantic errors turned into one-line SLIP errors."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        for err in e.errors():
            cause = err.get("ctx", {}).get("error")
            if isinstance(cause, InputError):
                raise cause from e
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"invalid {model.__name__}: {where}: {first['msg']}") from e
