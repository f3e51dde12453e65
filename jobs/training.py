"""The training kinds' requests and the datasets and checkpoints they move through the object store.

A ``train`` job's units are grid cells (:class:`TrainRequest`), an ``evaluate`` job's units are chunks of
composites for one ranker (:class:`EvaluateRequest`), a ``train-sam`` job has one unit (:class:`SamTrainRequest`);
each unit's request sits in the job's manifest pages. Datasets travel content-addressed::

    datasets/<manifest digest>/manifest.json   {"files": [{"path": "circle/00000.png", "sha256", "size"}]}
    datasets/blobs/<sha256>                    each file's bytes (deduplicated across datasets)

A worker materialises a dataset once into ``<SLIP_CACHE>/datasets/<digest>/`` (written beside, then renamed
into place). Task outputs (beside the job's manifest)::

    jobs/<job>/cells/<cell>/ranker/...         best checkpoint (config.json, model.safetensors, tokenizer)
                                               + curve.json + curve.png; --clip loads it
    jobs/<job>/cells/<cell>/result.json        lr, proj_dim, best validation loss, curve, worker
    jobs/<job>/eval/<ranker>/<chunk>.json      query results + gallery items of one chunk
    models/sam/<job>/sam.pth, config.json ...  a SAM training run's checkpoint directory
    jobs/<job>/result.json                     its summary (written last)

A ranker (or SAM) spec ``store:<prefix>`` names a checkpoint directory in the store.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from jobs.errors import ObjectNotFoundError
from jobs.keys import job_prefix, sha256_bytes, validate_key
from jobs.model import JOB_ID
from jobs.store import Store
from slip.errors import ConfigError, DatasetError
from slip.request import digest

STORE_SPEC = "store:"  # ranker spec prefix: a checkpoint directory in the object store
MARKER = ".complete"  # written last into a materialised directory
COCO_PATH = "_coco/annotations.json"  # where the producer puts a COCO file that lives outside the images
DEVICE = r"^(auto|cpu|cuda|cuda:\d+|mps)$"


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


class SamTrainRequest(BaseModel):
    """One SAM training run on a stored dataset: fine-tune ``sam`` or train ``arch`` from scratch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str = Field(pattern=JOB_ID.pattern)
    dataset: str = Field(pattern=r"^[0-9a-f]{64}$")  # dataset manifest digest (mask folder or COCO images)
    coco: Optional[str] = None  # path of the COCO instances file inside the dataset upload; None = mask folder
    sam: Optional[str] = Field(None, min_length=1)  # start checkpoint: vit_b | vit_l | vit_h | synth | tiny-random | store:<prefix> | worker PATH
    arch: Optional[str] = None  # or an architecture to build and train from scratch (slip.train.sam.ARCHS)
    epochs: int = Field(10, ge=1, le=1000)
    lr: Optional[float] = Field(None, gt=0.0, le=1.0)  # AdamW peak lr; None: 1e-4 fine-tuning, 1e-3 from scratch
    batch_images: int = Field(8, ge=1, le=256)  # images per step
    prompts_per_image: int = Field(8, ge=1, le=256)  # prompts sampled per image and step
    scenes_per_epoch: Optional[int] = Field(None, ge=1, le=10_000_000)  # None: one scene per training image
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)  # held-out share of the images
    val_scenes: int = Field(48, ge=1, le=100_000)  # fixed validation scenes
    freeze_image_encoder: bool = False  # decoder-only fine-tune (the usual choice for vit_b / vit_h)
    freeze_prompt_encoder: bool = False
    bf16: bool = False  # bfloat16 autocast for forward passes
    half: bool = False  # save fp16 weights
    seed: int = Field(0, ge=0, le=2**32 - 1)
    device: Optional[str] = Field(None, pattern=DEVICE)  # None: the worker's SLIP_DEVICE

    @field_validator("coco")
    @classmethod
    def _coco(cls, value: Optional[str]) -> Optional[str]:
        return None if value is None else validate_key(value)  # relative, no '..': stays inside the dataset

    @field_validator("arch")
    @classmethod
    def _arch(cls, value: Optional[str]) -> Optional[str]:
        from slip.train.sam import ARCHS

        if value is not None and value not in ARCHS:
            raise ConfigError(f"unknown SAM architecture {value!r}: use one of {', '.join(ARCHS)}")
        return value

    @model_validator(mode="after")
    def _one_start(self) -> "SamTrainRequest":
        from slip.train.sam import ARCHS

        if (self.sam is None) == (self.arch is None):
            raise ConfigError("give exactly one of a start checkpoint (--sam vit_b|synth|PATH|job:ID) or an "
                              f"architecture to train from scratch (--arch {'|'.join(ARCHS)})")
        return self

    def train_config(self, *, device: str):
        """The :class:`slip.train.sam.SamTrainConfig` of this request (no progress bar: a worker logs)."""
        from slip.train.sam import SCRATCH_LR, SamTrainConfig

        lr = self.lr if self.lr is not None else (SCRATCH_LR if self.arch is not None else SamTrainConfig.lr)
        return SamTrainConfig(
            epochs=self.epochs, lr=lr, batch_images=self.batch_images, prompts_per_image=self.prompts_per_image,
            scenes_per_epoch=self.scenes_per_epoch, val_fraction=self.val_fraction, val_scenes=self.val_scenes,
            freeze_image_encoder=self.freeze_image_encoder, freeze_prompt_encoder=self.freeze_prompt_encoder,
            bf16=self.bf16, half=self.half, seed=self.seed, device=self.device or device, progress=False,
        )


def sam_prefix(job_id: str) -> str:
    """``models/sam/<job>``: where a SAM training job's checkpoint directory goes."""
    return validate_key(f"models/sam/{job_id}")


def result_key(job_id: str) -> str:
    """``jobs/<job>/result.json``: a SAM training job's summary."""
    return f"{job_prefix(job_id)}/result.json"
