"""Fine-tune a ranker on a labelled image folder: the SLIP paper's recipe.

Recipe (paper, "Training"): seeded 80/20 split by image; captions ``{name}``; batch 64; the dual
encoder's loss :func:`~slip.train.contrastive.paper_clip_loss` (temperature 1, soft targets,
symmetric cross-entropy); AdamW with parameter groups (image backbone ``image_lr``, text encoder
``text_lr``, projection heads ``lr`` with weight decay); ``ReduceLROnPlateau(factor 0.9, patience 5)``
on the validation loss; the best-validation checkpoint is kept. A Hugging Face CLIP goes through the
same data path with CLIP's symmetric loss (:func:`~slip.train.contrastive.symmetric_clip_loss`).

Output directory (a ranker: ``--clip OUT`` loads it)::

    OUT/config.json, model.safetensors, tokenizer files   best-validation checkpoint
    OUT/curve.json   {"epochs": [{"epoch", "train_loss", "val_loss", "val_accuracy", "lr", "seconds"}], "best_epoch", ...}
                     (rewritten every epoch)
    OUT/curve.png    loss per epoch (matplotlib; drawn when training ends)
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

from slip.bars import progress_bar
from slip.data.dataset import CaptionDataset, caption_tokens
from slip.data.folder import LabelledFolder, scan_folder, split_records
from slip.device import resolve_device
from slip.errors import ConfigError, DatasetError
from slip.rankers.dual_encoder import DualEncoderConfig
from slip.train.towers import build_dual_encoder
from slip.train.trainees import LOSSES, Trainee, clip_trainee, dual_encoder_trainee, trainee_from_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """How a ranker is trained (the model itself is a DualEncoderConfig or a spec to fine-tune)."""

    epochs: int = 10  # passes over the training split
    batch_size: int = 64  # image-caption pairs per step (the paper: 64)
    lr: float = 1e-3  # projection heads (and CLIP's projections + logit scale): the grid's learning rate
    image_lr: float = 1e-4  # image backbone learning rate
    text_lr: float = 1e-5  # text encoder learning rate
    weight_decay: float = 1e-3  # AdamW weight decay of the projection heads (encoders: 0, as in the recipe)
    plateau_factor: float = 0.9  # ReduceLROnPlateau factor, on the validation loss
    plateau_patience: int = 5  # ReduceLROnPlateau patience, epochs
    val_fraction: float = 0.2  # held-out share of each class's images
    split_seed: int = 0  # seeds the train/val split (evaluation composites use the same held-out images)
    seed: int = 0  # seeds initialisation, shuffling and augmentation
    segment_view_prob: float = 0.5  # images with masks: probability of the cut-out (segment crop) view
    balance_classes: bool = False  # draw every class equally often (with replacement, as many draws an epoch as
    #                                training images), for skewed folders; the review recipe leaves it off (measured:
    #                                bench/results/review-job4-balance.json)
    caption_template: str = "{name}"  # caption of a class; the paper found "{name}" best
    loss: str = "paper"  # dual encoder: "paper" (temperature 1, soft targets) | "clip" (unit norm, learnt temperature)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_workers: int = 0  # DataLoader worker processes (0: load in the training process)
    max_steps_per_epoch: int | None = None  # cap on steps per epoch (smoke tests); None = the whole split
    progress: bool = True  # progress bars on stderr, on a terminal only (slip.bars)
    save_initial: bool = False  # also save the untrained starting point to OUT/initial (a baseline to evaluate)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2:
            raise ConfigError(f"need epochs >= 1 and batch_size >= 2, got {self.epochs} and {self.batch_size}")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        for name in ("lr", "image_lr", "text_lr"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be a finite learning rate >= 0, got {value}")


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced."""

    out: Path  # the checkpoint directory (best validation loss)
    best_epoch: int  # 1-based epoch of the kept checkpoint
    best_val_loss: float  # its validation loss
    history: list[dict] = field(default_factory=list)  # one record per epoch (as in curve.json)
    seconds: float = 0.0  # wall-clock training time


def train_ranker(dataset: str | Path, out: str | Path, *, model: DualEncoderConfig | None = None,
                 init: str | None = None, config: TrainConfig = TrainConfig(), cache_dir: Path | None = None,
                 on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    """Train on the image folder ``dataset`` and write the best checkpoint + curves to ``out``.

    ``init`` fine-tunes an existing ranker (a Hugging Face CLIP hub id or directory, ``tiny-random``,
    or one of our dual-encoder directories); otherwise a new dual encoder is built from ``model``.
    ``on_epoch`` receives each epoch's record (e.g. to report progress to a queue).
    """
    started = time.perf_counter()
    run = _prepare(dataset, model, init, config, cache_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if config.save_initial:
        run.trainee.save(out / "initial", training=_training_meta(run.folder, config, 0, None))
    history: list[dict] = []
    best = (0, math.inf)
    for epoch in range(1, config.epochs + 1):
        # 1. train one epoch, validate, step the plateau scheduler
        record = _epoch(run, epoch, config)
        history.append(record)
        # 2. keep the best-validation checkpoint; curves every epoch
        if record["val_loss"] < best[1]:
            best = (epoch, record["val_loss"])
            run.trainee.save(out, training=_training_meta(run.folder, config, epoch, record["val_loss"]))
        write_curve(out, history, best_epoch=best[0], plot=epoch == config.epochs)  # the PNG once, at the end
        log.info("epoch %d: train %.4f val %.4f acc %.3f", epoch, record["train_loss"], record["val_loss"],
                 record["val_accuracy"])
        if on_epoch is not None:
            on_epoch(record)
    return TrainResult(out=out, best_epoch=best[0], best_val_loss=best[1], history=history,
                       seconds=time.perf_counter() - started)


@dataclass
class _Run:
    """Everything one training run works with."""

    folder: LabelledFolder
    trainee: Trainee
    device: torch.device
    train_loader: DataLoader
    val_loader: DataLoader
    tokens: tuple[torch.Tensor, torch.Tensor]  # every class caption: (input_ids, attention_mask), (C, T)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau


def _prepare(dataset, model, init, config: TrainConfig, cache_dir) -> _Run:
    """Scan and split the dataset, build the model, the loaders, the optimiser and the scheduler."""
    device = resolve_device(config.device)
    folder = scan_folder(dataset, caption_template=config.caption_template)
    train_records, val_records = split_records(folder.records, val_fraction=config.val_fraction, seed=config.split_seed)
    if not val_records or len(train_records) < config.batch_size // 2:
        raise DatasetError(f"{folder.root} has {len(folder.records)} images: too few to train with batch size "
                           f"{config.batch_size} and a validation split")
    torch.manual_seed(config.seed)
    trainee = _trainee(model, init, config, cache_dir)
    trainee.module.to(device)
    views = {"image_size": trainee.image_size, "segment_view_prob": config.segment_view_prob}
    train_loader = _loader(CaptionDataset(train_records, **views, random=True, seed=config.seed), config, shuffle=True)
    val_loader = _loader(CaptionDataset(val_records, **views, random=False), config, shuffle=False)
    tokens = tuple(t.to(device) for t in caption_tokens(trainee.tokenizer, folder.captions, trainee.max_text_tokens))
    optimizer = torch.optim.AdamW(trainee.param_groups(lr=config.lr, image_lr=config.image_lr, text_lr=config.text_lr,
                                                       weight_decay=config.weight_decay), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=config.plateau_factor,
                                                           patience=config.plateau_patience)
    return _Run(folder, trainee, device, train_loader, val_loader, tokens, optimizer, scheduler)


def _epoch(run: _Run, epoch: int, config: TrainConfig) -> dict:
    """One epoch: training pass, validation, scheduler step; the epoch's record."""
    t0 = time.perf_counter()
    run.train_loader.dataset.set_epoch(epoch)
    train_loss = _run_epoch(run.trainee, run.train_loader, run.tokens, run.device, run.optimizer, config,
                            f"epoch {epoch}/{config.epochs}")
    val_loss, val_acc = _validate(run.trainee, run.val_loader, run.tokens, run.device)
    run.scheduler.step(val_loss)
    return {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_accuracy": val_acc,
            "lr": run.optimizer.param_groups[-1]["lr"], "seconds": round(time.perf_counter() - t0, 2)}


def _trainee(model: DualEncoderConfig | None, init: str | None, config: TrainConfig, cache_dir: Path | None) -> Trainee:
    if init is not None and model is not None:
        raise ConfigError("give either a new dual-encoder configuration or a ranker to fine-tune (--init), not both")
    if init is not None:
        return trainee_from_spec(init, cache_dir=cache_dir, loss=config.loss)
    built, tokenizer, origin = build_dual_encoder(model or DualEncoderConfig(), cache_dir=cache_dir, seed=config.seed)
    return dual_encoder_trainee(built, tokenizer, init=origin, loss=config.loss)


def _loader(dataset: CaptionDataset, config: TrainConfig, *, shuffle: bool) -> DataLoader:
    generator = torch.Generator().manual_seed(config.seed)
    drop_last = shuffle and len(dataset) > config.batch_size
    sampler = balanced_sampler(dataset.labels, generator) if shuffle and config.balance_classes else None
    return DataLoader(dataset, batch_size=config.batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      drop_last=drop_last, num_workers=config.num_workers, generator=generator, persistent_workers=False)


def balanced_sampler(labels: list[int], generator: torch.Generator) -> WeightedRandomSampler:
    """Indices of ``labels`` drawn with replacement, each image with probability 1 / (classes x its class's
    images): every class equally often in expectation; ``len(labels)`` draws per epoch."""
    counts = torch.bincount(torch.as_tensor(labels))
    weights = 1.0 / counts[torch.as_tensor(labels)].double()
    return WeightedRandomSampler(weights, num_samples=len(labels), replacement=True, generator=generator)


def _run_epoch(trainee: Trainee, loader: DataLoader, tokens, device, optimizer, config: TrainConfig, desc: str) -> float:
    trainee.module.train()
    ids, mask = tokens
    total, count = 0.0, 0
    steps = len(loader) if config.max_steps_per_epoch is None else min(len(loader), config.max_steps_per_epoch)
    bar = progress_bar(total=steps, desc=desc, unit="batch", enabled=config.progress, leave=False)
    for step, (pixels, labels) in enumerate(loader):
        if step >= steps:
            break
        loss = trainee.loss(pixels.to(device), labels.to(device), ids, mask)
        if not torch.isfinite(loss):
            raise ConfigError(f"training diverged at {desc}, step {step + 1} (loss {loss.item()}): lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(labels)
        count += len(labels)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    return total / max(count, 1)


@torch.no_grad()
def _validate(trainee: Trainee, loader: DataLoader, tokens, device) -> tuple[float, float]:
    """Mean validation loss (batches as in training) and top-1 image -> class-caption accuracy."""
    trainee.module.eval()
    ids, mask = tokens
    class_text = trainee.text_features(ids, mask)  # (C, D), eval mode: a caption's features do not vary
    class_unit = torch.nn.functional.normalize(class_text, dim=-1)
    total, count, hits = 0.0, 0, 0
    for pixels, labels in loader:
        pixels, labels = pixels.to(device), labels.to(device)
        image = trainee.image_features(pixels)
        text = class_text[labels]
        if len(labels) > 1:
            total += trainee.loss_from_features(image, text, labels).item() * len(labels)
            count += len(labels)
        hits += int((torch.nn.functional.normalize(image, dim=-1) @ class_unit.T).argmax(1).eq(labels).sum())
    return total / max(count, 1), hits / max(len(loader.dataset), 1)


def _training_meta(folder: LabelledFolder, config: TrainConfig, epoch: int, val_loss: float | None) -> dict:
    return {"dataset": str(folder.root), "classes": list(folder.class_names), "captions": list(folder.captions),
            "config": asdict(config), "best_epoch": epoch, "best_val_loss": val_loss}


def write_curve(out: Path, history: list[dict], *, best_epoch: int, plot: bool = True) -> None:
    """``curve.json`` and (``plot``) ``curve.png`` (train / validation loss per epoch, best epoch marked)."""
    (out / "curve.json").write_text(json.dumps({"epochs": history, "best_epoch": best_epoch}, indent=2))
    if plot:
        plot_curve(history, out / "curve.png", best_epoch=best_epoch)


def plot_curve(history: list[dict], path: Path, *, best_epoch: int | None = None, title: str = "ranker training") -> None:
    """Loss per epoch as a PNG (matplotlib, Agg backend; no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
    ax.plot(epochs, [h["val_loss"] for h in history], marker="o", label="validation loss")
    if best_epoch:
        ax.axvline(best_epoch, color="gray", linestyle="--", linewidth=1, label=f"best (epoch {best_epoch})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


__all__ = ["TrainConfig", "TrainResult", "balanced_sampler", "clip_trainee", "plot_curve", "train_ranker", "write_curve"]
