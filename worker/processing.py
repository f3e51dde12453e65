"""One image of a segment request, as plain functions over the worker's resources.

:func:`process_item` (engines ``slip`` and ``sam3-rank``) is idempotent: when
``results/<image>/<result digest>/segments.json`` exists it returns at once and writes nothing (rendering
missing PNGs if they are asked for now). Otherwise it takes the proposals and crop embeddings from the
proposals cache — a cached image is not even read — or computes and caches them, ranks them against the
prompts and writes the result with one store ``put_many`` (one durability barrier, ``segments.json`` last,
so its presence means the whole result is there). :func:`answer_item` (engine ``sam3``) does the same with
SAM 3's vision features as the prompt-independent state (kept in process, and in the store when the job
asked for it). Errors propagate; the failure policy (:mod:`worker.policy`) decides what they mean.
:func:`segment_unit` is the segment kind's unit: one image of a job, checked against the worker's models.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from jobs.errors import ModelMismatchError, ObjectNotFoundError, StoreError
from jobs.model import Item, ItemOutcome, JobManifest
from jobs.segment import SegmentSpec
from jobs.store import Store, result_prefix
from slip.errors import ImageError
from slip.images import load_image
from slip.outputs import RESULT_FILE, result_document, result_record, rendered_files
from slip.request import ResolvedRequest
from slip.timing import StageTimer
from slip.types import Proposals
from worker.models import mismatch
from worker.proposals import (
    CachedProposals,
    embeddings_key,
    features_key,
    load_embeddings,
    load_features,
    load_proposals,
    proposals_key,
    save_embeddings,
    save_proposals,
)


def segment_unit(res, manifest: JobManifest, item: Item, *, points_per_batch: int, node: str = "",
                 progress=None) -> ItemOutcome:
    """One image of a segment job on this worker's models (``res``: :class:`worker.resources.WorkerResources`);
    ModelMismatchError (transient: another worker may serve it) when the job names another engine or SAM."""
    spec = res.spec(manifest)
    problem = mismatch(res.settings.models, spec, res.hostname)
    if problem:
        raise ModelMismatchError(problem)
    engine = res.engine(spec.options, clip=spec.clip, points_per_batch=points_per_batch)
    if spec.engine == "sam3":
        return answer_item(res.store, engine, spec, item, res.models)
    return process_item(res.store, engine, spec, item)


def result_key(item: Item, request: ResolvedRequest, spec: SegmentSpec) -> str:
    """``results/<image sha256>/<result digest>``: where the item's files go."""
    return result_prefix(item.image_sha, request.result_digest(spec.prompts))


def process_item(store: Store, pipeline, spec: SegmentSpec, item: Item) -> ItemOutcome:
    """Segment one image for ``spec`` with ``pipeline`` (a ``slip.SLIP`` built from the resolved request);
    raises InputError subclasses for bad input, TransientError subclasses for trouble that may pass."""
    request: ResolvedRequest = pipeline.request
    prefix = result_key(item, request, spec)
    timer = StageTimer()
    # 0. the result exists: nothing to compute
    existing = _existing(store, prefix, spec, item, timer)
    if existing is not None:
        return existing
    # 1. prompt-independent work: proposals and crop embeddings, cached in the store
    image: np.ndarray | None = None
    with timer.stage("load_cache"):
        cached = load_proposals(store, proposals_key(item.image_sha, request))
        embeddings = None if cached is None else load_embeddings(store, embeddings_key(item.image_sha, request), pipeline.device)
    how = "cached"
    if cached is None or embeddings is None or embeddings.shape[0] != len(cached.segments):
        image = _read_image(store, item, spec, timer)
        cached, embeddings, how = _compute(store, pipeline, item, image, timer, cached)
    # 2. prompt-dependent work: one text encode per prompt and a matrix product
    render = spec.options.render
    masks = None
    if render or request.instances == "all":
        with timer.stage("decode_masks"):
            masks = cached.masks()
    similarity, matches = pipeline.rank(embeddings, spec.prompts, masks, timer)
    # 3. the result files, segments.json last, in one write
    files = {}
    if render:
        image = image if image is not None else _read_image(store, item, spec, timer)
        with timer.stage("render"):
            files = rendered_files(image, masks.masks, matches)
    runtime = {"points_per_batch": pipeline.generator.points_per_batch, "proposals": how}
    with timer.stage("encode_result"):  # in the chunk record's timings only (the document is built inside it)
        document = result_document(
            image_size=cached.image_size, prompts=spec.prompts, request=request, segments=cached.segments,
            similarity=similarity, matches=matches, generated=cached.generated, filters=cached.filters,
            timings=timer.seconds, runtime=runtime)
        files[RESULT_FILE] = json.dumps(document).encode()
    with timer.stage("write_result"):
        store.put_many({f"{prefix}/{name}": data for name, data in files.items()})
    return ItemOutcome(index=item.index, state="done", result_key=prefix, how=how,
                       found=[len(m.instances) for m in matches],
                       timings_s={k: round(v, 6) for k, v in timer.seconds.items()})


def _existing(store: Store, prefix: str, spec: SegmentSpec, item: Item, timer: StageTimer) -> ItemOutcome | None:
    """The outcome of a result already in the store (its PNGs rendered now when asked for and missing)."""
    try:
        with timer.stage("check_result"):
            doc = store.get_json(f"{prefix}/{RESULT_FILE}")
    except ObjectNotFoundError:
        return None
    if spec.options.render and not store.exists(f"{prefix}/mask_0.png"):
        _render_existing(store, prefix, doc, spec, item, timer)
    found = [len(m.get("instances", ())) for m in doc.get("matches", [])]
    return ItemOutcome(index=item.index, state="done", result_key=prefix, how="existing", found=found,
                       timings_s={k: round(v, 6) for k, v in timer.seconds.items()})


def _render_existing(store: Store, prefix: str, doc: dict, spec: SegmentSpec, item: Item, timer: StageTimer) -> None:
    from slip.outputs import maskset_from_records
    from slip.types import Match

    size = (doc["image_size"]["height"], doc["image_size"]["width"])
    with timer.stage("decode_masks"):
        masks = maskset_from_records(doc["segments"], *size).masks
    pair = lambda p: (p["segment"], p["score"])  # noqa: E731
    matches = [Match(prompt=m["prompt"], instances=tuple(map(pair, m["instances"])),
                     best=None if m["best"] is None else pair(m["best"]), threshold=m["threshold"],
                     top_k=tuple(map(pair, m["top_k"]))) for m in doc["matches"]]
    image = _read_image(store, item, spec, timer)
    with timer.stage("render"):
        files = rendered_files(image, masks, matches)
    with timer.stage("write_result"):
        store.put_many({f"{prefix}/{name}": data for name, data in files.items()})


def _compute(store: Store, pipeline, item: Item, image: np.ndarray, timer: StageTimer,
             cached: CachedProposals | None) -> tuple[CachedProposals, torch.Tensor, str]:
    """Proposals (cached ones reused) and fresh embeddings, both saved to the cache."""
    request = pipeline.request
    if cached is None:
        proposals = pipeline.propose(image, timer)
        with timer.stage("encode_proposals"):  # masks to COCO RLE records
            cached = CachedProposals.of(proposals)
        segments, how = proposals.segments, "computed"
        with timer.stage("save_proposals"):
            save_proposals(store, proposals_key(item.image_sha, request), cached, request)
    else:
        with timer.stage("decode_masks"):  # the cached RLE masks, to crop them for the (new) ranker
            segments, how = cached.masks().to(pipeline.generator.device), "cached"
    embeddings = pipeline.embed(image, Proposals(segments, (), cached.generated), timer)
    with timer.stage("save_embeddings"):
        save_embeddings(store, embeddings_key(item.image_sha, request), embeddings)
    return cached, embeddings, how


def _read_image(store: Store, item: Item, spec: SegmentSpec, timer: StageTimer) -> np.ndarray:
    with timer.stage("read_input"):
        try:
            data = store.get_bytes(item.image_key)
        except ObjectNotFoundError as e:
            raise ImageError(f"input {item.image_key} ({item.name}) is missing from the store: submit it again") from e
    with timer.stage("decode_image"):
        return load_image(data, max_pixels=spec.options.max_pixels)


def answer_item(store: Store, engine, spec: SegmentSpec, item: Item, warm) -> ItemOutcome:
    """Segment one image with the ``sam3`` engine (a :class:`slip.engines.Sam3Engine`): its vision features from
    this process (``warm``: :class:`worker.models.WarmModels`), else from the store, else computed (and stored when
    ``spec.keep_features``); then SAM 3's text encoder and decoders for the prompts. Every answer is computed from
    the packed (fp16) features, wherever they came from, so a result never depends on the cache."""
    request: ResolvedRequest = engine.request
    prefix = result_key(item, request, spec)
    timer = StageTimer()
    existing = _existing(store, prefix, spec, item, timer)
    if existing is not None:
        return existing
    key, image, source = (item.image_sha, request.proposal_digest()), None, "process"
    with timer.stage("load_cache"):
        vision = warm.features(key)
        if vision is None and (data := load_features(store, features_key(item.image_sha, request))) is not None:
            vision, source = _unpack(engine, data, features_key(item.image_sha, request)), "store"
    if vision is None:
        image, source = _read_image(store, item, spec, timer), "computed"
        fresh = engine.prepare(image, timer)
        with timer.stage("pack_features"):
            data = engine.concepts.pack(fresh)
            vision = engine.concepts.unpack(data)
        if spec.keep_features:
            with timer.stage("save_features"):
                store.put_bytes(features_key(item.image_sha, request), data)
    warm.keep_features(key, vision)
    result = engine.answer(None, vision, spec.prompts, timer)
    files = {}
    if spec.options.render:
        image = image if image is not None else _read_image(store, item, spec, timer)
        with timer.stage("render"):
            files = rendered_files(image, result.proposals.segments.masks, result.matches)
    how = "computed" if source == "computed" else "cached"
    runtime = {"points_per_batch": engine.generator.points_per_batch, "proposals": how, "features": source}
    with timer.stage("encode_result"):
        files[RESULT_FILE] = json.dumps(result_record(result, spec.prompts, request, runtime)).encode()
    with timer.stage("write_result"):
        store.put_many({f"{prefix}/{name}": data for name, data in files.items()})
    return ItemOutcome(index=item.index, state="done", result_key=prefix, how=how,
                       found=[len(m.instances) for m in result.matches],
                       timings_s={k: round(v, 6) for k, v in timer.seconds.items()})


def _unpack(engine, data: bytes, key: str):
    from safetensors import SafetensorError

    try:
        return engine.concepts.unpack(data)
    except (KeyError, ValueError, SafetensorError) as e:
        raise StoreError(f"cached SAM 3 features {key!r} are malformed ({e}); delete them to recompute") from e
