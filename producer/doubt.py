"""Order a job's items by doubt, for review (``--order doubt``, exports and gallery).

Per prompt, the certainty of an image's answer is :func:`slip.review.prompt_certainty` of its
``segments.json``: the smaller of the margin between the best and second-best segment and the distance of
the best score to the prompt's threshold (the calibrated one the result recorded). ``--order doubt`` is
:func:`slip.review.doubt_order`: rounds over the prompts, each giving its least certain image not taken
yet, so every prompt gets its hardest images reviewed (ties: job order). Done items only: failed and
unfinished items have no answer to doubt. With ``limit`` only each prompt's ``limit`` least certain items are
kept while reading (memory grows with prompts x ``limit``, not with the job); without one every done item is
held until the end. :func:`review_score` (``1 - image doubt / prompts``, :func:`slip.review.image_doubt`) is
the one-number summary the Label Studio export carries as its prediction score.
"""

from __future__ import annotations

import heapq
from typing import Iterable, Iterator, Sequence

import numpy as np

from producer.exports_items import DONE, ExportItem, item_doc
from slip.errors import ConfigError, DatasetError
from slip.review import doubt_order, image_doubt, prompt_certainty

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


def certainties(doc: dict, prompts: Sequence[str], *, name: str = "") -> list[float]:
    """Per job prompt, the certainty of the document's answer (1.0 for a prompt it does not answer)."""
    similarity, limits = _answers(doc, prompts, name)
    asked = [p for p in prompts if any(m.get("prompt") == p for m in doc["matches"])]
    by_prompt = {p: prompt_certainty(similarity[:, k], limits[k]) for k, p in enumerate(asked)}
    return [by_prompt.get(p, 1.0) for p in prompts]


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


def doubtful(items: Iterable[ExportItem], *, prompts: Sequence[str], limit: int | None = None) -> list[ExportItem]:
    """The done items in :func:`slip.review.doubt_order`, at most ``limit``; reads ``items`` once, keeping only
    each prompt's ``limit`` least certain items (and their documents)."""
    heaps: list[list[tuple[float, int]]] = [[] for _ in prompts]  # per prompt: (-certainty, -seq), root dropped first
    kept: dict[int, tuple[ExportItem, list[float]]] = {}
    holders: dict[int, int] = {}  # seq -> how many prompt heaps hold it
    for seq, item in enumerate(items):
        if item.state != DONE:
            continue
        values = certainties(item_doc(item), prompts, name=item.name)
        held = 0
        for heap, value in zip(heaps, values):
            entry = (-value, -seq)
            if limit is None or len(heap) < limit:
                heapq.heappush(heap, entry)
            elif entry > heap[0]:
                _release(-heapq.heapreplace(heap, entry)[1], holders, kept)
            else:
                continue
            held += 1
        if held:
            kept[seq], holders[seq] = (item, values), held
    seqs = sorted(kept)
    order = doubt_order(np.array([kept[s][1] for s in seqs]).reshape(len(seqs), len(prompts)), limit)
    return [kept[seqs[k]][0] for k in order]


def _release(seq: int, holders: dict[int, int], kept: dict) -> None:
    holders[seq] -= 1
    if holders[seq] == 0:
        del holders[seq], kept[seq]
