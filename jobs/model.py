"""The job model, one for every kind of job: a manifest, its units, and one completion record per chunk.

A job of ``total`` units (images, grid cells, evaluation tasks, one SAM training run) is cut into *chunks*
of ``batch_size`` consecutive units; chunk ``c`` holds units ``[c * batch_size, (c + 1) * batch_size)`` and
is what one task message ``(job, chunk, attempt)`` names. Everything here is JSON (Celery is configured
for JSON only) and small: images, masks, checkpoints live in the store, only their keys appear here.
"""

from __future__ import annotations

import math
import re
import secrets
from datetime import datetime, timezone
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
Kind = Literal["segment", "train", "evaluate", "train-sam"]
UNITS = {"segment": "image", "train": "cell", "evaluate": "task", "train-sam": "run"}  # what one unit is
MAX_CHUNK = 64  # units per chunk at most
PAGE_ITEMS = 1024  # about this many units per manifest page (a multiple of the chunk size)


class Item(BaseModel):
    """One unit of a job: an image (``image_key``, ``image_sha``) or a task ``request`` (other kinds)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int = Field(ge=0)  # position in the job
    name: str = ""  # images: path relative to the submitted root, "/"-separated; others: a label for people
    image_key: str = ""  # segment: inputs/<sha256>.<ext>
    image_sha: str = Field("", pattern=r"^([0-9a-f]{64})?$")  # segment: sha256 of the image bytes
    request: dict = {}  # train, evaluate, train-sam: the unit's request (jobs.training payloads)

    @field_validator("image_key")
    @classmethod
    def _key(cls, value: str) -> str:
        from jobs.keys import validate_key

        if value and not validate_key(value).startswith("inputs/"):
            raise ValueError(f"image key {value!r} is not under inputs/")
        return value


class JobManifest(BaseModel):
    """A job's header, ``jobs/<job id>/manifest.json``; its units are in pages beside it."""

    job_id: str = Field(pattern=JOB_ID.pattern)
    kind: Kind = "segment"
    format_version: int = 3
    created: str  # ISO 8601 UTC
    spec: dict  # the kind's spec (segment: jobs.segment.SegmentSpec as JSON; others: what reports need)
    batch_size: int = Field(ge=1, le=MAX_CHUNK)  # units per chunk
    total: int = Field(ge=1)  # units in the job
    page_size: int = Field(ge=1)  # units per manifest page (a multiple of batch_size)
    root: str = ""  # the submitted root on the producer's machine, for people only

    @field_validator("spec", mode="before")
    @classmethod
    def _spec(cls, value: object) -> object:
        return value.model_dump(mode="json") if isinstance(value, BaseModel) else value

    @property
    def chunks(self) -> int:
        return math.ceil(self.total / self.batch_size)

    def chunk_range(self, chunk: int) -> range:
        """Unit indices of ``chunk``."""
        start = chunk * self.batch_size
        return range(start, min(start + self.batch_size, self.total))

    def page_of(self, index: int) -> int:
        return index // self.page_size

    @staticmethod
    def page_size_for(batch_size: int) -> int:
        return batch_size * max(1, PAGE_ITEMS // batch_size)


class ItemOutcome(BaseModel):
    """How one unit of a chunk ended (inside a chunk's completion record)."""

    index: int
    state: Literal["done", "failed"]
    result_key: str = ""  # where its output is (segment: results/<image sha>/<result digest>)
    how: Literal["computed", "cached", "existing", "none"] = "none"  # proposals computed / cached / result existed
    permanent: bool = False  # failed: a retry of the same request cannot help
    reason: Optional[str] = None  # failed: why, one line
    error: Optional[str] = None  # failed: the error class (or Poison, TimeLimit), for people
    found: list[int] = []  # segment, done: instances found per prompt
    timings_s: dict[str, float] = {}  # stage -> seconds

    @property
    def letter(self) -> str:
        """``d`` done, ``p`` failed for good, ``t`` failed for now (a later attempt may succeed)."""
        return "d" if self.state == "done" else ("p" if self.permanent else "t")


class ChunkRecord(BaseModel):
    """A chunk's completion record, ``jobs/<job>/done/c<chunk>-<letters>.json`` (the letters, one per unit,
    let status count states from a listing alone)."""

    job_id: str
    chunk: int
    attempt: int = 0  # which send of the chunk ran
    task_id: str
    worker: str
    finished: str  # ISO 8601 UTC
    items: list[ItemOutcome]

    @property
    def letters(self) -> str:
        return "".join(item.letter for item in self.items)


def new_job_id() -> str:
    """``YYYYmmdd-HHMMSS-xxxxxx``: sortable by time, unique by its random tail."""
    return f"{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
