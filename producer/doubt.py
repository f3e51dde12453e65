"""Order a job's items by doubt, for review (``--order doubt``, exports and gallery).

``--order doubt`` is :func:`slip.review.doubt_order` over each image's
:func:`slip.review.expected_corrections` of its ``segments.json``: its doubtful answers (per prompt, the
smaller of the margin between the best and second-best segment and the distance of the best score to the
prompt's threshold, the calibrated one the result recorded) plus its segments no prompt claims; the most
first, ties in job order. Done items only: failed and unfinished items have no answer to doubt. With
``limit`` only the ``limit`` most doubtful items are kept while reading (memory grows with ``limit``, not
with the job); without one every done item is held until the end. :func:`review_score` (``1 - image doubt /
prompts``, :func:`slip.review.image_doubt`) is the one-number summary the Label Studio export carries as its
prediction score.
"""

from __future__ import annotations

import heapq
from typing import Iterable, Iterator, Sequence

import numpy as np

from producer.exports_items import DONE, ExportItem, item_doc
from slip.errors import ConfigError, DatasetError
from slip.review import doubt_order, expected_corrections, image_doubt

ORDERS = ("job", "doubt")  # job: the job's order (streamed); doubt: slip.review.doubt_order


def _answers(doc: dict, prompts: Sequence[str], name: str) -> tuple[np.ndarray, list[float | None]]:
    """``(similarity (N, P), thresholds)`` of a document over the job's prompts (those it answers)."""
    try:
        thresholds = {m["prompt"]: m.get("threshold") for m in doc["matches"]}
        asked = [p for p in prompts if p in thresholds]
        similarity = np.array([[s["similarity"][p] for p in asked] for s in doc["segments"]], np.float64)
        limits = [None if thresholds[p] is None else float(thresholds[p]) for p in asked]
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetError(f"malformed segments.json for {name or 'an image'}: {type(e).__name__}: {e}") from e
    return similarity.reshape(len(doc["segments"]), len(asked)), limits


def review_score(doc: dict, prompts: Sequence[str], *, name: str = "") -> float:
    """``1 - image doubt / prompts`` in ``[0, 1]``: the Label Studio prediction score (low = in doubt)."""
    similarity, limits = _answers(doc, prompts, name)
    return 1.0 - image_doubt(similarity, limits) / max(1, len(limits))


def ordered(items: Iterable[ExportItem], *, order: str = "job", limit: int | None = None,
            prompts: Sequence[str] = ()) -> Iterator[ExportItem]:
    """``items`` in ``order`` (:data:`ORDERS`), at most ``limit`` of them (None: all)."""
    if order not in ORDERS:
        raise ConfigError(f"unknown --order {order!r}: use one of {', '.join(ORDERS)}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    if order == "job":
        for k, item in enumerate(items):
            if limit is not None and k >= limit:
                return
            yield item
        return
    yield from doubtful(items, prompts=prompts, limit=limit)


def corrections(doc: dict, prompts: Sequence[str], *, name: str = "") -> float:
    """:func:`slip.review.expected_corrections` of a document over the job's prompts (those it answers)."""
    similarity, limits = _answers(doc, prompts, name)
    return expected_corrections(similarity, limits)


def doubtful(items: Iterable[ExportItem], *, prompts: Sequence[str], limit: int | None = None) -> list[ExportItem]:
    """The done items in :func:`slip.review.doubt_order`, at most ``limit``; reads ``items`` once, keeping only
    the ``limit`` most doubtful (and their documents)."""
    entries = ((corrections(item_doc(item), prompts, name=item.name), -seq, item)
               for seq, item in enumerate(items) if item.state == DONE)
    kept = list(entries) if limit is None else heapq.nlargest(limit, entries, key=lambda e: e[:2])
    kept.sort(key=lambda e: -e[1])  # job order, then doubt_order (ties stay in job order)
    order = doubt_order([e[0] for e in kept])
    return [kept[k][2] for k in order]
