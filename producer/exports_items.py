"""What every exporter reads: a job's items, each image's answers, and the files they write.

An :class:`ExportItem` is one image of a job as the ledger knows it (see docs/CONTRACTS.md, "Export
items"); its ``doc`` is the image's ``segments.json`` (format version 2: a prompt's ``instances`` list,
``[]`` = not found). Version-1 documents (one ``segment`` / ``score`` per match, ``segment: null`` = no
match) written before the v2 change are read too.

:func:`answers` turns a document into one :class:`Answer` per job prompt, each with its chosen
:class:`Instance` s (COCO RLE, with box and area computed by pycocotools from that RLE).
:func:`atomic_file` writes a file under a temporary name and renames it at the end, so a failed export
never leaves a half-written file where a complete one is expected.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from slip.errors import DatasetError

DONE, FAILED = "done", "failed"  # the item states exporters write; other states are skipped
MAX_NOTES = 20  # notes kept in a summary


@dataclass(frozen=True)
class ExportItem:
    """One image of a job, as the ledger hands it to the exporters."""

    index: int  # position in the job's manifest
    name: str  # file name relative to the submitted root, "/"-separated (e.g. "cats/a.jpg")
    state: str  # done | failed | (other states are skipped by exporters)
    doc: dict | None  # the segments.json v2 document (done only)
    reason: str | None  # failure reason (failed only)
    image: Callable[[], bytes] | None  # reads the input image bytes from the store (gallery, --copy-images)
    image_file: str | None = None  # the image as a local file (a directory store), for --link-images; else None


@dataclass(frozen=True)
class ExportSummary:
    """What :func:`producer.exports.write_export` wrote."""

    format: str  # coco | coco-results | jsonl | yolo | polygons
    paths: tuple[Path, ...]  # files and folders written
    written: int  # images written (done, plus failed ones for jsonl / polygons)
    skipped: int  # items not written: other states, failures a format cannot hold, ids not in image_ids
    instances: int  # annotations / label rows / features written
    notes: tuple[str, ...] = ()  # one line each: renamed label files, skipped names, ...
    uncertain: int = 0  # done images left out because an answer scored under min_score (counted in skipped)


@dataclass(frozen=True)
class Instance:
    """One chosen segment of one prompt."""

    category: int  # index of its prompt in the job's prompts (COCO category id - 1, YOLO class)
    segment: int  # index into the document's "segments"
    score: float  # the ranker's similarity
    rle: dict  # COCO RLE {"size": [H, W], "counts": str}

    def bbox(self) -> list[float]:
        """``[x, y, w, h]`` pixels, ``pycocotools.mask.toBbox`` of the RLE (``w = x_max - x_min + 1``)."""
        return [float(v) for v in mask_utils.toBbox(self.rle)]

    def area(self) -> int:
        """Pixels in the mask."""
        return int(mask_utils.area(self.rle))

    def mask(self) -> np.ndarray:
        """``(H, W) bool``."""
        return mask_utils.decode(self.rle).astype(bool)


@dataclass(frozen=True)
class Answer:
    """One prompt's answer on one image."""

    prompt: str
    category: int  # index in the job's prompts
    instances: tuple[Instance, ...]  # best first; () = not found (an explicit empty answer)
    best: tuple[int, float] | None  # (segment, score) of the best candidate whatever the threshold
    threshold: float | None  # the threshold applied (None = none)


def image_size(doc: dict) -> tuple[int, int]:
    """``(H, W)`` of a segments.json document; :class:`DatasetError` when it has none."""
    try:
        return int(doc["image_size"]["height"]), int(doc["image_size"]["width"])
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetError(f"malformed segments.json: no image_size ({type(e).__name__}: {e})") from e


def item_doc(item: ExportItem) -> dict:
    """The segments.json document of a done item; :class:`DatasetError` when it has none."""
    if item.doc is None:
        raise DatasetError(f"{item.name} is done but has no segments.json document")
    return item.doc


def answers(doc: dict, prompts: Sequence[str], *, name: str = "") -> list[Answer]:
    """The document's answer to each job prompt, in the job's prompt order; prompts the document does
    not answer are left out. Raises :class:`DatasetError` (naming ``name``) for a malformed document."""
    try:
        by_prompt = {m["prompt"]: m for m in doc["matches"]}
        return [_answer(by_prompt[p], c, doc["segments"]) for c, p in enumerate(prompts) if p in by_prompt]
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise DatasetError(f"malformed segments.json for {name or 'an image'}: {type(e).__name__}: {e}") from e


def _answer(match: dict, category: int, segments: list[dict]) -> Answer:
    if "instances" in match:  # format version 2
        chosen = [(i["segment"], i["score"]) for i in match["instances"]]
        best = (match["best"]["segment"], match["best"]["score"]) if match.get("best") else None
    else:  # format version 1: one segment, None = no match
        chosen = [] if match["segment"] is None else [(match["segment"], match["score"])]
        best = chosen[0] if chosen else None
    instances = tuple(Instance(category, int(s), float(score), _rle(segments[int(s)])) for s, score in chosen)
    best = None if best is None else (int(best[0]), float(best[1]))
    return Answer(match["prompt"], category, instances, best, match.get("threshold"))


def _rle(segment: dict) -> dict:
    rle = segment["segmentation"]
    size, counts = rle["size"], rle["counts"]
    if not isinstance(counts, str):
        raise ValueError("segmentation counts must be a compressed RLE string")
    return {"size": [int(size[0]), int(size[1])], "counts": counts}


@dataclass
class Tally:
    """Running counts of one export (constant memory: at most ``MAX_NOTES`` notes are kept)."""

    written: int = 0
    skipped: int = 0
    instances: int = 0
    notes: list[str] = field(default_factory=list)
    more_notes: int = 0
    uncertain: int = 0

    def keep(self, items: Iterable[ExportItem], states: frozenset[str]) -> Iterator[ExportItem]:
        """The items whose state is in ``states``; the others are counted as skipped."""
        for item in items:
            if item.state in states:
                yield item
            else:
                self.skipped += 1

    def confident(self, items: Iterable[ExportItem], prompts: Sequence[str],
                  min_score: float | None) -> Iterator[ExportItem]:
        """The items less the done ones with a chosen instance scoring under ``min_score`` (counted as
        skipped and uncertain). A whole image is left out, not just the instance: an object that was there
        must not become background in a training set. ``None``: every item."""
        for item in items:
            if min_score is not None and item.state == DONE and any(
                    inst.score < min_score for a in answers(item_doc(item), prompts, name=item.name)
                    for inst in a.instances):
                self.skipped += 1
                self.uncertain += 1
            else:
                yield item

    def note(self, line: str) -> None:
        if len(self.notes) < MAX_NOTES:
            self.notes.append(line)
        else:
            self.more_notes += 1

    def summary(self, format: str, *paths: Path) -> ExportSummary:
        notes = self.notes + ([f"... and {self.more_notes} more"] if self.more_notes else [])
        return ExportSummary(format, paths, self.written, self.skipped, self.instances, tuple(notes), self.uncertain)


@contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO]:
    """Open ``path.partial`` for writing; rename it to ``path`` on success, delete it on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
