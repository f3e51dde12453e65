"""One image of a segment request, as plain functions over the worker's resources.

``process_item`` is idempotent: when ``results/<image>/<request>/segments.json`` exists it returns a
``skipped`` record and writes nothing. Otherwise it reads the image from the store, takes the SAM
proposals and crop embeddings from the proposals cache (or computes and caches them), ranks them
against the prompts and writes the same files as ``slip segment``. ``segments.json`` is written last,
so its presence means the whole result is there; every file is written atomically, so a crash or a
redelivery never leaves a torn file and a second run rewrites identical masks rather than adding any.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Iterator

import torch

from slip.errors import ImageError, ObjectNotFoundError
from slip.images import load_image
from slip.outputs import render_outputs
from slip.types import SlipResult
from worker.jobs import GENERATOR_FIELDS, Item, ItemRecord, SegmentSpec
from worker.proposals import (
    embeddings_key,
    load_embeddings,
    load_proposals,
    proposals_key,
    save_embeddings,
    save_proposals,
)
from worker.resources import WorkerResources
from worker.store import ERROR_FILE, RESULT_FILE, Store


class StageTimer:
    """Wall-clock seconds per named stage (same protocol as the pipeline's own timer)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, device: torch.device | None = None) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def existing_record(store: Store, spec: SegmentSpec, item: Item) -> ItemRecord | None:
    """A ``skipped`` record when the item's result is already in the store, else None."""
    prefix = spec.result_key(item)
    key = f"{prefix}/{RESULT_FILE}"
    if not store.exists(key):
        return None
    doc = store.get_json(key)
    matches = doc.get("matches", [])
    return ItemRecord(
        index=item.index,
        result_key=prefix,
        status="skipped",
        segments=len(doc.get("segments", [])),
        scores=[m.get("score") for m in matches],
        matches=[m.get("segment") for m in matches],
    )


def process_item(res: WorkerResources, spec: SegmentSpec, item: Item, *, points_per_batch: int | None) -> ItemRecord:
    """Segment one image for ``spec``; raises InputError subclasses for bad input."""
    done = existing_record(res.store, spec, item)
    if done is not None:
        return done
    timer = StageTimer()
    # 1. the image, from the store
    with timer.stage("read_input"):
        data = _read_input(res.store, item)
    with timer.stage("decode_image"):
        image = load_image(data, max_pixels=spec.params.max_pixels)
    pipeline = res.pipeline(spec.params, points_per_batch=points_per_batch)
    generator = res.generator_options(spec.params)  # resolved: they and the chain name the cached proposals
    filters = res.filter_chain(spec.params)
    # 2. prompt-independent work: proposals and crop embeddings, cached in the store
    proposals, source = _proposals(res.store, pipeline, spec, item, image, timer, generator, filters)
    embeddings = _embeddings(res.store, pipeline, spec, item, image, proposals, timer, generator, filters,
                             fresh=source == "computed")
    # 3. prompt-dependent work: one text encode and a matrix product
    similarity, matches = pipeline.rank(embeddings, spec.prompts, timer)
    result = SlipResult(
        image_size=(int(image.shape[0]), int(image.shape[1])),
        proposals=proposals,
        similarity=similarity.cpu(),
        matches=matches,
        timings=timer.seconds,
    )
    # 4. the same files as `slip segment`, segments.json last
    params = params_record(spec, points_per_batch or res.settings.points_per_batch, generator, filters)
    params["pipeline"] = pipeline.params()
    files = render_outputs(image, result, spec.prompts, params)
    prefix = spec.result_key(item)
    with timer.stage("write_result"):
        write_result(res.store, prefix, files)
    return ItemRecord(
        index=item.index,
        result_key=prefix,
        status="done",
        proposals=source,
        segments=len(proposals.segments),
        scores=[m.score for m in matches],
        matches=[m.index for m in matches],
        timings_s={k: round(v, 6) for k, v in timer.seconds.items()},
    )


def params_record(spec: SegmentSpec, points_per_batch: int, generator: dict, filters: str) -> dict:
    """Every setting behind a result, recorded in its segments.json; the SAM options and the filter chain
    as resolved (``generator``: ``WorkerResources.generator_options``, ``filters``:
    ``WorkerResources.filter_chain``), not as requested."""
    return {
        "sam": spec.sam,
        "clip": spec.clip,
        **spec.params.model_dump(),
        **{name: generator[name] for name in GENERATOR_FIELDS},
        "filters": filters,
        "points_per_batch": points_per_batch,
        "request_digest": spec.request_digest(),
    }


def write_result(store: Store, prefix: str, files: dict[str, bytes]) -> None:
    """Write every file atomically, the commit marker last; a stale error.json is removed."""
    for name, data in files.items():
        if name != RESULT_FILE:
            store.put_bytes(f"{prefix}/{name}", data)
    store.put_bytes(f"{prefix}/{RESULT_FILE}", files[RESULT_FILE])
    store.delete(f"{prefix}/{ERROR_FILE}")


def write_failure(
    store: Store, spec: SegmentSpec, item: Item, *, reason: str, error: str, permanent: bool, task_id: str, worker: str
) -> ItemRecord:
    """Record why ``item`` failed in ``error.json`` (unless a result exists: success wins)."""
    prefix = spec.result_key(item)
    if not store.exists(f"{prefix}/{RESULT_FILE}"):
        store.put_json(
            f"{prefix}/{ERROR_FILE}",
            {
                "reason": reason,
                "error": error,
                "permanent": permanent,
                "task_id": task_id,
                "worker": worker,
                "image_key": item.image_key,
                "name": item.name,
                "time": utc_now(),
            },
        )
    return ItemRecord(index=item.index, result_key=prefix, status="failed", reason=reason, error=error)


def _read_input(store: Store, item: Item) -> bytes:
    try:
        return store.get_bytes(item.image_key)
    except ObjectNotFoundError as e:
        raise ImageError(f"input {item.image_key} ({item.name}) is missing from the store: submit it again") from e


def _proposals(store, pipeline, spec, item, image, timer, generator, filters):
    """Filtered SAM proposals from the cache, or computed and cached; and which of the two."""
    key = proposals_key(spec, item, generator, filters)
    if store.exists(key):
        with timer.stage("load_proposals"):
            return load_proposals(store, key), "cached"
    proposals = pipeline.propose(image, timer)
    with timer.stage("save_proposals"):
        save_proposals(store, key, proposals, spec.params.proposal_identity(spec.sam, generator, filters))
    return proposals, "computed"


def _embeddings(store, pipeline, spec, item, image, proposals, timer, generator, filters, *,
                fresh: bool) -> torch.Tensor:
    """``(N, D)`` crop embeddings from the cache, or computed and cached (always when ``fresh``:
    newly computed proposals must not be paired with embeddings cached for an earlier copy)."""
    key = embeddings_key(spec, item, generator, filters)
    if not fresh and store.exists(key):
        with timer.stage("load_embeddings"):
            cached = load_embeddings(store, key, pipeline.device)
        if cached.shape[0] == len(proposals.segments):
            return cached
    embeddings = pipeline.embed(image, proposals, timer)
    with timer.stage("save_embeddings"):
        save_embeddings(store, key, embeddings)
    return embeddings
