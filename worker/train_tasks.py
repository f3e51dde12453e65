"""Training and evaluation as queue tasks: ``slip.train`` (one grid cell), ``slip.evaluate`` (a chunk
of composites for one ranker). Both run on the ``gpu`` queue.

Datasets travel through the object store, content-addressed, so any worker can use them::

    datasets/<manifest digest>/manifest.json   {"files": [{"path": "circle/00000.png", "sha256", "size"}]}
    datasets/blobs/<sha256>                    each file's bytes (deduplicated across datasets)

A worker materialises a dataset once into ``<SLIP_CACHE>/datasets/<digest>/`` (written beside, then
renamed into place). Task outputs (job ids come from the producer)::

    jobs/<job>/training.json                   the producer's ledger: kind, requests, task ids
    jobs/<job>/cells/<cell>/ranker/...         best checkpoint (config.json, model.safetensors,
                                               tokenizer) + curve.json + curve.png; --clip loads it
    jobs/<job>/cells/<cell>/result.json        lr, proj_dim, best validation loss, curve, worker
    jobs/<job>/eval/<ranker>/<chunk>.json      query results + gallery items of one chunk

A ranker spec ``store:<prefix>`` names a checkpoint directory in the store (e.g. a cell's ``ranker``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from slip.errors import ConfigError, DatasetError, InputError, WeightsError
from worker.jobs import JOB_ID, parse_model
from worker.store import Store, digest, job_prefix, sha256_bytes, validate_key

log = logging.getLogger("slip.worker")

STORE_SPEC = "store:"  # ranker spec prefix: a checkpoint directory in the object store
MARKER = ".complete"  # written last into a materialised directory


# --- payloads ------------------------------------------------------------------------------------------


class TrainRequest(BaseModel):
    """One grid cell: a dual encoder (or a ranker to fine-tune) trained on a stored dataset."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str = Field(pattern=JOB_ID.pattern)
    cell: int = Field(ge=0)  # index in the grid
    dataset: str = Field(pattern=r"^[0-9a-f]{64}$")  # dataset manifest digest
    model: dict = {}  # DualEncoderConfig fields; a new dual encoder must set pretrained_image and pretrained_text
    train: dict = {}  # TrainConfig fields
    init: Optional[str] = None  # ranker spec to fine-tune instead of a new dual encoder

    @field_validator("model")
    @classmethod
    def _model_fields(cls, value: dict) -> dict:
        from dataclasses import fields

        from slip.rankers.dual_encoder import DualEncoderConfig

        unknown = sorted(set(value) - {f.name for f in fields(DualEncoderConfig)})
        if unknown:
            raise ConfigError(f"unknown dual-encoder fields in the training request: {', '.join(unknown)}")
        return value

    @model_validator(mode="after")
    def _explicit_init(self) -> "TrainRequest":
        """A new dual encoder says where each tower starts: never a silent default (random or pretrained)."""
        missing = [k for k in ("pretrained_image", "pretrained_text") if not isinstance(self.model.get(k), bool)]
        if self.init is None and missing:
            raise ConfigError(f"the training request must set model.{' and model.'.join(missing)} (true: the "
                              "pretrained weights, which the worker must have on disk; false: random init on purpose)")
        return self


class EvaluateRequest(BaseModel):
    """Composites ``start .. stop - 1`` of a stored dataset, scored for one ranker."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str = Field(pattern=JOB_ID.pattern)
    ranker_index: int = Field(ge=0)  # position of the ranker in the job
    ranker: str = Field(min_length=1)  # ranker spec (hub id, synth, tiny-random, store:<prefix>)
    chunk: int = Field(ge=0)
    start: int = Field(ge=0)
    stop: int = Field(ge=1)
    dataset: str = Field(pattern=r"^[0-9a-f]{64}$")
    seed: int = 0  # composite seed
    split_seed: int = 0  # train/validation split seed (composites use held-out images)
    split: Literal["val", "all"] = "val"  # val: the split's validation images; all: a dataset nobody trained on
    caption_template: str = "{name}"
    tile_size: int = Field(128, ge=16, le=1024)
    proposals: Literal["oracle", "sam"] = "oracle"
    sam: Optional[str] = None  # SAM spec for proposals="sam" (default: the worker's)
    gallery: int = Field(0, ge=0, le=32)  # gallery items to keep from this chunk
    judge: Optional[str] = None  # classifier judge directory (local to the worker or store:<prefix>)


# --- datasets and directories in the store --------------------------------------------------------------


def dataset_files(root: Path) -> list[Path]:
    """Every regular, non-hidden file under ``root`` (images, masks, classes.json), sorted."""
    if not root.is_dir():
        raise DatasetError(f"dataset directory {root} does not exist: expected one sub-directory per class")
    return sorted(p for p in root.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts))


def directory_manifest(root: Path, *, extra: dict[str, Path] | None = None) -> dict:
    """``{"files": [{"path", "sha256", "size"}]}`` of every file under ``root``, plus the files ``extra``
    places at the relative paths it names (replacing a file of ``root`` at that path); its digest names it."""
    sources = {path.relative_to(root).as_posix(): path for path in dataset_files(root)}  # sorted by Path
    sources.update({rel: path for rel, path in sorted((extra or {}).items())})
    files = []
    for rel, path in sources.items():
        data = path.read_bytes()
        files.append({"path": rel, "sha256": sha256_bytes(data), "size": len(data)})
    if not files:
        raise DatasetError(f"{root} holds no files")
    return {"files": files}


def upload_directory(store: Store, root: Path, *, kind: str = "datasets", extra: dict[str, Path] | None = None) -> str:
    """Upload ``root`` (and ``extra``, see :func:`directory_manifest`) content-addressed; returns the
    manifest digest (skips what is already there)."""
    manifest = directory_manifest(root, extra=extra)
    sources = {**{e["path"]: root / e["path"] for e in manifest["files"]}, **(extra or {})}
    for entry in manifest["files"]:
        blob = f"{kind}/blobs/{entry['sha256']}"
        if not store.exists(blob):
            store.put_bytes(blob, sources[entry["path"]].read_bytes())
    key = digest(manifest)
    if not store.exists(f"{kind}/{key}/manifest.json"):
        store.put_json(f"{kind}/{key}/manifest.json", manifest)
    return key


def materialize(store: Store, key: str, cache_root: Path, *, kind: str = "datasets") -> Path:
    """The directory behind manifest ``key``, downloaded once into ``cache_root/<kind>/<key>``."""
    validate_key(f"{kind}/{key}")
    target = cache_root / kind / key
    if (target / MARKER).is_file():
        return target
    manifest = store.get_json(f"{kind}/{key}/manifest.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=target.parent))
    try:
        for entry in manifest["files"]:
            rel = PurePosixPath(entry["path"])
            if rel.is_absolute() or ".." in rel.parts:
                raise DatasetError(f"dataset {key} lists an unsafe path {entry['path']!r}")
            data = store.get_bytes(f"{kind}/blobs/{entry['sha256']}")
            if sha256_bytes(data) != entry["sha256"]:
                raise DatasetError(f"blob {entry['sha256']} of dataset {key} is corrupt in the store")
            out = staging.joinpath(*rel.parts)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
        (staging / MARKER).write_text(str(time.time()))
        try:
            os.replace(staging, target)  # atomic; loses to a concurrent winner, which is as good
        except OSError:
            if not (target / MARKER).is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def put_directory(store: Store, local: Path, prefix: str) -> list[str]:
    """Copy every file under ``local`` to ``prefix/<relative path>``; returns the keys."""
    return [store.put_bytes(f"{prefix}/{p.relative_to(local).as_posix()}", p.read_bytes()) for p in dataset_files(local)]


def get_directory(store: Store, prefix: str, local: Path) -> Path:
    """Copy every object under ``prefix`` into ``local``; returns ``local``."""
    keys = store.list(prefix)
    if not keys:
        from slip.errors import ObjectNotFoundError

        raise ObjectNotFoundError(f"nothing under {prefix!r} in store {store.url}")
    for key in keys:
        out = local / key[len(prefix) + 1 :]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(store.get_bytes(key))
    return local


def ranker_directory(store: Store, spec: str, cache_root: Path) -> str:
    """A loadable spec: ``store:<prefix>`` becomes a local directory (the store's own for a directory
    store, a cached download otherwise); other specs pass through."""
    if not spec.startswith(STORE_SPEC):
        return spec
    prefix = validate_key(spec[len(STORE_SPEC):].strip("/"))
    if store.local:
        return store.path(prefix)
    target = cache_root / "rankers" / digest({"store": store.url, "prefix": prefix})
    if not (target / MARKER).is_file():
        get_directory(store, prefix, target)
        (target / MARKER).write_text(str(time.time()))
    return str(target)


def cell_prefix(job_id: str, cell: int) -> str:
    return f"{job_prefix(job_id)}/cells/{cell}"


def chunk_key(job_id: str, ranker_index: int, chunk: int) -> str:
    return f"{job_prefix(job_id)}/eval/{ranker_index}/{chunk}.json"


def _cache_root(res) -> Path:
    from slip.weights import resolve_cache_dir

    return resolve_cache_dir(res.settings.cache_dir)


# --- tasks ----------------------------------------------------------------------------------------------


def register(app) -> None:
    """Register the training and evaluation tasks on ``app``."""
    app.task(name="slip.train", bind=True, throws=(InputError, WeightsError))(train)
    app.task(name="slip.evaluate", bind=True, throws=(InputError, WeightsError))(evaluate)


def train(self, request: dict) -> dict:
    """Train one grid cell; the checkpoint and curves go to ``jobs/<job>/cells/<cell>/``."""
    res = self.app.slip_resources.get()
    req = parse_model(TrainRequest, request)

    def progress(record: dict) -> None:
        self.update_state(state="PROGRESS", meta={"cell": req.cell, **record})

    return run_train(res, req, worker=self.request.hostname or res.hostname, on_epoch=progress)


def evaluate(self, request: dict) -> dict:
    """Score one chunk of composites for one ranker; the results go to ``jobs/<job>/eval/...``."""
    res = self.app.slip_resources.get()
    return run_evaluate(res, parse_model(EvaluateRequest, request))


# --- plain functions ------------------------------------------------------------------------------------


def run_train(res, req: TrainRequest, *, worker: str, on_epoch=None) -> dict:
    """Materialise the dataset, train, upload the best checkpoint; returns the cell's result record."""
    from slip.rankers.dual_encoder import DualEncoderConfig
    from slip.train.ranker import TrainConfig, train_ranker

    cache = _cache_root(res)
    dataset = materialize(res.store, req.dataset, cache)
    try:
        model = None if req.init else DualEncoderConfig.from_json(req.model)
        config = TrainConfig(**{**req.train, "device": res.settings.device, "progress": False})
    except TypeError as e:
        raise InputError(f"invalid training options: {e}") from e
    prefix = cell_prefix(req.job_id, req.cell)
    with tempfile.TemporaryDirectory(prefix="slip-train-") as tmp:
        init = ranker_directory(res.store, req.init, cache) if req.init else None
        result = train_ranker(dataset, Path(tmp) / "ranker", model=model, init=init, config=config,
                              cache_dir=res.settings.cache_dir, on_epoch=on_epoch)
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
    warm = res.ranker is not None and req.ranker == res.settings.clip
    ranker = res.ranker.ranker if warm else load_ranker(ranker_directory(res.store, req.ranker, cache),
                                                 device=res.settings.device, cache_dir=res.settings.cache_dir)
    proposer = None
    if req.proposals == "sam":
        sam = req.sam or res.settings.sam
        warm_sam = res.sam is not None and sam == res.settings.sam
        proposer = sam_proposer(res.sam if warm_sam else sam, device=res.settings.device,
                                cache_dir=res.settings.cache_dir)
    judge = None
    if req.judge:
        from slip.train.judge import load_judge

        judge = load_judge(ranker_directory(res.store, req.judge, cache), device=res.settings.device)
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
