"""SAM training as a job unit: a ``train-sam`` job has one unit, one run of :func:`slip.train.sam.train_sam`
(:func:`train_sam_unit`); the request and where the outputs go are in :mod:`jobs.training`. The checkpoint
directory loads with ``--sam DIR`` once copied out of the store (``slip submit train-sam --wait --out DIR``),
or in place for a directory store; ``store:models/sam/<job>`` (or ``job:<job>`` given to the producer)
starts another training run from it.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from jobs.errors import ObjectNotFoundError
from jobs.model import Item, ItemOutcome, JobManifest
from jobs.training import (STORE_SPEC, SamTrainRequest, materialize, put_directory, ranker_directory, result_key,
                           sam_prefix)
from slip.errors import ConfigError, DatasetError
from slip.options import parse_model

log = logging.getLogger("slip.worker")


def train_sam_unit(res, manifest: JobManifest, item: Item, *, points_per_batch: int = 0, node: str = "",
                   progress=None) -> ItemOutcome:
    """Train one SAM; the checkpoint goes to ``models/sam/<job>/``, the summary to ``jobs/<job>/result.json``."""
    req = parse_model(SamTrainRequest, item.request)
    on_epoch = None if progress is None else (lambda record: progress({"job_id": req.job_id, "epochs": req.epochs,
                                                                        **record}))
    run_train_sam(res, req, worker=node or res.hostname, on_epoch=on_epoch)
    return ItemOutcome(index=item.index, state="done", result_key=result_key(req.job_id))


def run_train_sam(res, req: SamTrainRequest, *, worker: str, on_epoch=None) -> dict:
    """Materialise the dataset, train, upload the checkpoint directory; returns the summary record.

    A request whose summary is already in the store (a redelivered message) returns it without training."""
    from slip.train.sam import train_sam as train
    from slip.weights import resolve_cache_dir

    try:
        return res.store.get_json(result_key(req.job_id))
    except ObjectNotFoundError:
        pass
    cache = resolve_cache_dir(res.settings.models.cache_dir)
    # 1. the dataset, and the COCO file inside it
    dataset = _materialize(res, req.dataset, cache)
    coco = dataset.joinpath(*req.coco.split("/")) if req.coco else None
    if coco is not None and not coco.is_file():
        raise DatasetError(f"dataset {req.dataset} holds no COCO file {req.coco!r}")
    config = req.train_config(device=res.settings.models.device)
    start = _start_checkpoint(res, req.sam, cache) if req.sam else None
    prefix = sam_prefix(req.job_id)
    with tempfile.TemporaryDirectory(prefix="slip-train-sam-") as tmp:
        # 2. train (the best-validation checkpoint and the curves land in tmp/sam)
        result = train(dataset, Path(tmp) / "sam", start=start, arch=req.arch, coco=coco, config=config,
                       cache_dir=res.settings.models.cache_dir, on_epoch=on_epoch)
        # 3. the checkpoint directory to the store
        files = sorted(k[len(prefix) + 1:] for k in put_directory(res.store, result.out, prefix))
    summary = {
        "job_id": req.job_id, "request": req.model_dump(mode="json"), "arch": result.arch.name,
        "epochs": req.epochs, "best_epoch": result.best_epoch, "best_val_miou": result.best_val_miou,
        "start_val_miou": result.history[0].get("val_miou"), "history": result.history,
        "seconds": round(result.seconds, 2), "store_prefix": prefix, "checkpoint": f"{STORE_SPEC}{prefix}",
        "files": files, "device": config.device, "worker": worker,
    }
    res.store.put_json(result_key(req.job_id), summary)  # last: the job is finished
    log.info("SAM training %s: best mIoU %.4f at epoch %d -> %s", req.job_id, result.best_val_miou,
             result.best_epoch, prefix)
    return summary


def _materialize(res, key: str, cache: Path) -> Path:
    try:
        return materialize(res.store, key, cache)
    except ObjectNotFoundError as e:
        raise DatasetError(f"dataset {key} is not in store {res.store.url}: upload it again with "
                           "`slip submit train-sam DATASET`") from e


def _start_checkpoint(res, spec: str, cache: Path) -> str:
    """A spec ``train_sam`` loads: ``store:<prefix>`` becomes a local directory, others pass through."""
    try:
        return ranker_directory(res.store, spec, cache)
    except ObjectNotFoundError as e:
        raise ConfigError(f"start checkpoint {spec!r} is not in store {res.store.url}") from e
