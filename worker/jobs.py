"""Job payloads (pydantic): what a producer sends, what a task returns, what the ledger holds.

Everything here travels as JSON (Celery is configured for JSON only) and stays small: image bytes,
masks and embeddings live in the object store and only their keys appear in these records.
"""

from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from slip.errors import ConfigError, InputError, PromptError
from slip.images import DEFAULT_MAX_PIXELS
from slip.pipeline import validate_prompts
from worker.store import digest, result_prefix, validate_key

MAX_PROMPTS = 32  # prompts per request
MAX_ITEMS_PER_TASK = 64  # K, images per segment task
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
GENERATOR_FIELDS = ("points_per_side", "pred_iou_thresh", "stability_score_thresh", "box_nms_thresh")  # SAM options


class SegmentParams(BaseModel):
    """Output-changing parameters of a segment request (all part of the result key).

    The SAM options default to None: the worker SAM's recommended value (the generator.json beside its
    checkpoint), else SAM's own default; see :meth:`generator_options`. ``filters`` likewise defaults to
    None: the worker SAM's recommended chain (its filters.json), else the paper's ``containment``; see
    :meth:`filter_chain`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    points_per_side: Optional[int] = Field(None, ge=1, le=256)  # SAM point grid side; SAM default 32
    pred_iou_thresh: Optional[float] = Field(None, ge=0.0, le=1.0)  # SAM predicted-IoU threshold; default 0.88
    stability_score_thresh: Optional[float] = Field(None, ge=0.0, le=1.0)  # SAM stability threshold; default 0.95
    box_nms_thresh: Optional[float] = Field(None, ge=0.0, le=1.0)  # SAM box NMS IoU (1.0 = no NMS); default 0.7
    filters: Optional[str] = None  # filter chain, e.g. "containment:0.8,min_area:50,disjoint"; None = the
    # worker SAM's filters.json chain, else "containment"
    crop_background: Literal["black", "gray", "blur", "none"] = "black"  # segment crop background
    crop_padding: float = Field(0.0, ge=0.0, le=2.0)  # crop padding, fraction of the box side
    square: bool = True  # pad crops to a square before resizing
    top_k: int = Field(5, ge=1, le=100)  # candidates listed per prompt
    threshold: Optional[float] = Field(None, ge=-1.0, le=1.0)  # similarity below = "no match"
    one_to_one: bool = False  # Hungarian assignment: prompts never share a segment
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)  # refuse larger images

    def generator_kwargs(self) -> dict:
        """The ``slip.MaskGenerator`` keyword arguments given explicitly (the options left None are absent)."""
        given = {name: getattr(self, name) for name in GENERATOR_FIELDS}
        return {name: value for name, value in given.items() if value is not None}

    def generator_options(self, recommended: dict) -> dict:
        """Every output-changing ``slip.MaskGenerator`` option, resolved: SAM's defaults < ``recommended``
        (the worker SAM's generator.json) < the options given here. ``points_per_batch`` is left out: it
        comes from the worker and changes speed, not output."""
        from slip.sam import mask_generator_defaults

        options = {**mask_generator_defaults(), **recommended, **self.generator_kwargs()}
        options.pop("points_per_batch", None)
        return options

    def filter_chain(self, recommended: str | None) -> str:
        """The filter chain to run, resolved: the paper's ``containment`` < ``recommended`` (the worker SAM's
        filters.json) < the chain given here."""
        from slip.sam import resolve_filters

        return resolve_filters(self.filters, recommended)

    def proposal_identity(self, sam: str, generator: dict, filters: str) -> dict:
        """What the prompt-independent proposals depend on: ``generator`` from :meth:`generator_options`, the
        chain ``filters`` from :meth:`filter_chain`, recorded as each filter's resolved parameters (so two
        spellings of one chain share proposals and two different chains never do)."""
        from slip.filters import parse_filters

        chain = [{"name": f.name, **f.params()} for f in parse_filters(filters)]
        return {"sam": sam, "generator": generator, "filters": chain}

    @field_validator("filters")
    @classmethod
    def _filters(cls, value: Optional[str]) -> Optional[str]:
        """A bad chain is refused when the job is built (producer side), not first by a worker."""
        if value is not None:
            from slip.filters import parse_filters

            try:
                parse_filters(value)
            except ConfigError as e:
                raise ValueError(str(e)) from e
        return value

    def embedding_identity(self, clip: str) -> dict:
        """What the crop embeddings depend on (besides the proposals)."""
        return {
            "clip": clip,
            "crop": {"background": self.crop_background, "padding": self.crop_padding, "square": self.square},
        }


class Item(BaseModel):
    """One image of a job."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int = Field(ge=0)  # position in the job's manifest
    image_key: str  # inputs/<sha256>.<ext>
    image_sha: str = Field(pattern=r"^[0-9a-f]{64}$")  # sha256 of the image bytes
    name: str = ""  # where the producer found it (path), for reports only

    @field_validator("image_key")
    @classmethod
    def _key(cls, value: str) -> str:
        validate_key(value)
        if not value.startswith("inputs/"):
            raise ValueError(f"image key {value!r} is not under inputs/")
        return value


class SegmentSpec(BaseModel):
    """Prompts, models and parameters shared by every item of a job."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompts: tuple[str, ...] = Field(min_length=1, max_length=MAX_PROMPTS)
    sam: str = Field(min_length=1)  # SAM spec the result must come from
    clip: str = Field(min_length=1)  # ranker spec the result must come from
    params: SegmentParams = SegmentParams()

    @field_validator("prompts", mode="before")
    @classmethod
    def _prompts(cls, value: object) -> tuple[str, ...]:
        return clean_prompts(value)

    def request_digest(self) -> str:
        """sha256 over prompts, models and parameters: the second level of the result key."""
        return digest({"prompts": list(self.prompts), "sam": self.sam, "clip": self.clip, "params": self.params.model_dump()})

    def result_key(self, item: Item) -> str:
        """``results/<image sha256>/<request digest>``: where the item's files go."""
        return result_prefix(item.image_sha, self.request_digest())


class SegmentRequest(BaseModel):
    """The argument of one ``slip.segment`` task: K images, one spec."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str = Field(pattern=JOB_ID.pattern)
    items: tuple[Item, ...] = Field(min_length=1, max_length=MAX_ITEMS_PER_TASK)
    spec: SegmentSpec
    points_per_batch: Optional[int] = Field(None, ge=1)  # runtime override (halved after an OOM)

    @staticmethod
    def parse(data: object) -> "SegmentRequest":
        """Validate a task payload; ValidationError becomes an InputError subclass."""
        return parse_model(SegmentRequest, data)


class ItemRecord(BaseModel):
    """What a task reports for one image (small: keys, scores, timings)."""

    index: int
    result_key: str
    status: Literal["done", "skipped", "failed"]  # skipped = the result already existed
    proposals: Literal["computed", "cached", "none"] = "none"  # where the SAM proposals came from
    segments: int = 0  # proposals after filtering
    scores: list[Optional[float]] = []  # similarity of the match of each prompt (None = no segments)
    matches: list[Optional[int]] = []  # chosen segment of each prompt (None = no match)
    timings_s: dict[str, float] = {}  # stage -> seconds
    reason: Optional[str] = None  # failure reason
    error: Optional[str] = None  # failure class name


class SegmentResponse(BaseModel):
    """The return value of a ``slip.segment`` task."""

    job_id: str
    task_id: str
    worker: str
    items: list[ItemRecord]


class JobManifest(BaseModel):
    """The ledger of a job, ``jobs/<job id>/manifest.json``."""

    job_id: str = Field(pattern=JOB_ID.pattern)
    kind: Literal["segment"] = "segment"
    created: str  # ISO 8601 UTC
    spec: SegmentSpec
    batch_size: int = Field(ge=1, le=MAX_ITEMS_PER_TASK)  # K, images per task
    items: tuple[Item, ...]


class TaskRecord(BaseModel):
    """``jobs/<job id>/tasks/<task id>.json``: which items one enqueued task carries."""

    task_id: str
    items: list[int]  # item indices
    attempt: int = 0  # 0 = first submit, n = n-th `slip retry`
    enqueued: str  # ISO 8601 UTC


def clean_prompts(value: object) -> tuple[str, ...]:
    """Prompts stripped; PromptError when none, blank or too long (``slip.pipeline`` rules)."""
    if not isinstance(value, (str, list, tuple)):
        raise PromptError(f"prompts must be a list of strings, got {type(value).__name__}")
    return validate_prompts(value)


def parse_model(model: type[BaseModel], data: object):
    """``model.model_validate(data)`` with pydantic errors turned into SLIP errors."""
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
