"""SAM training as a queue task: ``slip.train_sam`` (one run of :func:`slip.train.sam.train_sam`), on the
``gpu`` queue like ``slip.train``.

The dataset travels through the store like the ranker's (see :mod:`worker.train_tasks`): a mask folder,
or COCO images with their instances file placed inside the upload (the producer puts it at
:data:`COCO_PATH`). Outputs (job ids come from the producer)::

    jobs/<job>/training.json       the producer's ledger: kind "train-sam", the request, the task id
    models/sam/<job>/sam.pth       best-validation weights, official SAM state-dict format
    models/sam/<job>/config.json   the SamArch (non-official sizes); plus training.json, curve.json,
                                   curve.png and whatever else the run wrote (generator.json, ...)
    jobs/<job>/result.json         the summary returned by the task (written last: the job is done)

The checkpoint directory loads with ``--sam DIR`` once copied out of the store (``slip submit train-sam
--wait --out DIR``), or in place for a directory store; ``store:models/sam/<job>`` (or ``job:<job>`` given
to the producer) starts another training run from it.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from slip.errors import ConfigError, DatasetError, InputError, ObjectNotFoundError, WeightsError
from worker.jobs import JOB_ID, parse_model
from worker.store import job_prefix, validate_key
from worker.train_tasks import STORE_SPEC, materialize, put_directory, ranker_directory

log = logging.getLogger("slip.worker")

COCO_PATH = "_coco/annotations.json"  # where the producer puts a COCO file that lives outside the images
DEVICE = r"^(auto|cpu|cuda|cuda:\d+|mps)$"


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
    """``models/sam/<job>``: where a job's checkpoint directory goes."""
    return validate_key(f"models/sam/{job_id}")


def result_key(job_id: str) -> str:
    return f"{job_prefix(job_id)}/result.json"


# --- task -----------------------------------------------------------------------------------------------


def register(app) -> None:
    """Register the SAM training task on ``app``."""
    app.task(name="slip.train_sam", bind=True, throws=(InputError, WeightsError))(train_sam)


def train_sam(self, request: dict) -> dict:
    """Train one SAM; the checkpoint goes to ``models/sam/<job>/``, the summary to ``jobs/<job>/result.json``."""
    res = self.app.slip_resources.get()
    req = parse_model(SamTrainRequest, request)

    def progress(record: dict) -> None:
        self.update_state(state="PROGRESS", meta={"job_id": req.job_id, "epochs": req.epochs, **record})

    return run_train_sam(res, req, worker=self.request.hostname or res.hostname, on_epoch=progress)


# --- plain function -------------------------------------------------------------------------------------


def run_train_sam(res, req: SamTrainRequest, *, worker: str, on_epoch=None) -> dict:
    """Materialise the dataset, train, upload the checkpoint directory; returns the summary record.

    A request whose summary is already in the store (a redelivered message) returns it without training."""
    from slip.train.sam import train_sam as train
    from slip.weights import resolve_cache_dir

    try:
        return res.store.get_json(result_key(req.job_id))
    except ObjectNotFoundError:
        pass
    cache = resolve_cache_dir(res.settings.cache_dir)
    # 1. the dataset, and the COCO file inside it
    dataset = _materialize(res, req.dataset, cache)
    coco = dataset.joinpath(*req.coco.split("/")) if req.coco else None
    if coco is not None and not coco.is_file():
        raise DatasetError(f"dataset {req.dataset} holds no COCO file {req.coco!r}")
    config = req.train_config(device=res.settings.device)
    start = _start_checkpoint(res, req.sam, cache) if req.sam else None
    prefix = sam_prefix(req.job_id)
    with tempfile.TemporaryDirectory(prefix="slip-train-sam-") as tmp:
        # 2. train (the best-validation checkpoint and the curves land in tmp/sam)
        result = train(dataset, Path(tmp) / "sam", start=start, arch=req.arch, coco=coco, config=config,
                       cache_dir=res.settings.cache_dir, on_epoch=on_epoch)
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
