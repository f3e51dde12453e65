"""Training and evaluation units: one ``train`` job unit is one grid cell (:func:`train_unit`), one
``evaluate`` unit a chunk of composites scored for one ranker (:func:`evaluate_unit`). The requests, the
datasets and where the outputs go are in :mod:`jobs.training`.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from jobs.model import Item, ItemOutcome, JobManifest
from jobs.training import (
    STORE_SPEC,
    EvaluateRequest,
    TrainRequest,
    cell_prefix,
    chunk_key,
    materialize,
    put_directory,
    ranker_directory,
)
from slip.errors import InputError
from slip.options import parse_model


def _cache_root(res) -> Path:
    from slip.weights import resolve_cache_dir

    return resolve_cache_dir(res.settings.models.cache_dir)


def train_unit(res, manifest: JobManifest, item: Item, *, points_per_batch: int = 0, node: str = "",
               progress=None) -> ItemOutcome:
    """Train one grid cell; its checkpoint and record go to ``jobs/<job>/cells/<cell>/``."""
    req = parse_model(TrainRequest, item.request)
    on_epoch = None if progress is None else (lambda record: progress({"cell": req.cell, **record}))
    run_train(res, req, worker=node or res.hostname, on_epoch=on_epoch)
    return ItemOutcome(index=item.index, state="done", result_key=f"{cell_prefix(req.job_id, req.cell)}/result.json")


def evaluate_unit(res, manifest: JobManifest, item: Item, *, points_per_batch: int = 0, node: str = "",
                  progress=None) -> ItemOutcome:
    """Score one chunk of composites for one ranker; the results go to ``jobs/<job>/eval/...``."""
    summary = run_evaluate(res, parse_model(EvaluateRequest, item.request))
    return ItemOutcome(index=item.index, state="done", result_key=summary["key"])


def run_train(res, req: TrainRequest, *, worker: str, on_epoch=None) -> dict:
    """Materialise the dataset, train, upload the best checkpoint; returns the cell's result record."""
    from slip.rankers.dual_encoder import DualEncoderConfig
    from slip.train.ranker import TrainConfig, train_ranker

    cache = _cache_root(res)
    dataset = materialize(res.store, req.dataset, cache)
    try:
        model = None if req.init else DualEncoderConfig.from_json(req.model)
        config = TrainConfig(**{**req.train, "device": res.settings.models.device, "progress": False})
    except TypeError as e:
        raise InputError(f"invalid training options: {e}") from e
    prefix = cell_prefix(req.job_id, req.cell)
    with tempfile.TemporaryDirectory(prefix="slip-train-") as tmp:
        init = ranker_directory(res.store, req.init, cache) if req.init else None
        result = train_ranker(dataset, Path(tmp) / "ranker", model=model, init=init, config=config,
                              cache_dir=res.settings.models.cache_dir, on_epoch=on_epoch)
        put_directory(res.store, result.out, f"{prefix}/ranker")
    record = {
        "job_id": req.job_id, "cell": req.cell, "lr": config.lr, "proj_dim": (model.proj_dim if model else None),
        "model": req.model, "train": req.train, "best_val_loss": result.best_val_loss, "best_epoch": result.best_epoch,
        "history": result.history, "checkpoint": f"{STORE_SPEC}{prefix}/ranker", "seconds": round(result.seconds, 2),
        "worker": worker,
    }
    res.store.put_json(f"{prefix}/result.json", record)
    return record


def run_evaluate(res, req: EvaluateRequest) -> dict:
    """Score composites ``req.start .. req.stop - 1`` for ``req.ranker``; writes the chunk file."""
    from slip.evaluate import composite_source, evaluate, sam_proposer
    from slip.rankers.loading import load_ranker
    from slip.report import gallery_item

    cache = _cache_root(res)
    dataset = materialize(res.store, req.dataset, cache)
    source = composite_source(dataset, seed=req.seed, split_seed=req.split_seed, split=req.split,
                              caption_template=req.caption_template,
                              tile_size=req.tile_size)
    warm = res.ranker is not None and req.ranker == res.settings.models.clip
    ranker = res.ranker.ranker if warm else load_ranker(ranker_directory(res.store, req.ranker, cache),
                                                 device=res.settings.models.device, cache_dir=res.settings.models.cache_dir)
    proposer = None
    if req.proposals == "sam":
        sam = req.sam or res.settings.models.sam
        warm_sam = getattr(res.sam, "family", None) in ("sam", "sam2") and sam == res.settings.models.sam
        proposer = sam_proposer(res.sam if warm_sam else sam, device=res.settings.models.device,
                                cache_dir=res.settings.models.cache_dir)
    judge = None
    if req.judge:
        from slip.train.judge import load_judge

        judge = load_judge(ranker_directory(res.store, req.judge, cache), device=res.settings.models.device)
    kept: list = []

    def keep(ev) -> None:
        if len(kept) < req.gallery:
            kept.append(gallery_item(ev, ranker=req.ranker))

    start = time.perf_counter()
    results = evaluate(ranker, source.take(req.stop - req.start, start=req.start), proposer=proposer, keep=keep,
                       judge=judge)
    key = chunk_key(req.job_id, req.ranker_index, req.chunk)
    res.store.put_bytes(key, json.dumps({
        "request": req.model_dump(mode="json"), "results": [r.to_json() for r in results],
        "gallery": [g.to_json() for g in kept], "seconds": round(time.perf_counter() - start, 3),
    }).encode())
    plain = [r for r in results if r.mode == "plain"]
    return {"job_id": req.job_id, "ranker_index": req.ranker_index, "chunk": req.chunk, "key": key,
            "queries": len(plain), "correct": sum(r.correct for r in plain)}
