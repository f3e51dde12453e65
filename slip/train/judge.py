"""The paper's classifier judge: a ResNet-18 trained to name the class of an image.

The paper scored SLIP by classifying the chosen segment with a supervised ResNet-18 (97 % accurate on
its data) and comparing the label with the prompt. Our primary score is judge-free
(:mod:`slip.evaluate`); the judge is the optional second opinion, with its own held-out accuracy.

Checkpoint directory::

    config.json        {"architecture": "slip-judge", "backbone", "classes", "image_size", "mean", "std",
                        "val_accuracy", "epochs", "init"}
    model.safetensors  the classifier's weights
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from slip.bars import progress_bar
from slip.data.dataset import CaptionDataset
from slip.data.folder import scan_folder, split_records
from slip.device import resolve_device
from slip.errors import ConfigError, WeightsError, WeightsNotFoundError

log = logging.getLogger(__name__)

ARCHITECTURE = "slip-judge"


@dataclass(frozen=True)
class JudgeConfig:
    """How the judge is built and trained."""

    backbone: str = "resnet18"  # timm classifier (the paper: ResNet-18)
    image_size: int = 64  # side in pixels of the crops it classifies
    epochs: int = 10  # training epochs
    batch_size: int = 64  # images per step
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 1e-4  # AdamW weight decay
    segment_view_prob: float = 0.5  # images with masks: share of cut-out segment views
    seed: int = 0  # initialisation, shuffling and augmentation
    split_seed: int = 0  # the 80/20 split (use the ranker's, so the judge never saw the test images)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    progress: bool = True  # progress bars on stderr, on a terminal only (slip.bars)


class Judge:
    """A trained classifier: ``classify`` ``(B, 3, S, S)`` in ``[0, 1]`` -> ``(B,)`` int64 labels."""

    def __init__(self, model: torch.nn.Module, meta: dict, *, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.meta = meta
        self.class_names: tuple[str, ...] = tuple(meta["classes"])
        self.image_size: int = int(meta["image_size"])
        self._mean = torch.tensor(meta["mean"], device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(meta["std"], device=self.device).view(1, 3, 1, 1)

    @property
    def val_accuracy(self) -> float:
        return float(self.meta.get("val_accuracy", float("nan")))

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(self.device, torch.float32)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False)
        return self.model((x - self._mean) / self._std)

    @torch.inference_mode()
    def classify(self, pixels: torch.Tensor) -> torch.Tensor:
        if len(pixels) == 0:
            return torch.zeros(0, dtype=torch.long)
        return self.logits(pixels).argmax(1).cpu()


def _build(backbone: str, classes: int):
    import timm

    if not timm.is_model(backbone):
        raise ConfigError(f"unknown timm backbone {backbone!r} for the judge (e.g. resnet18)")
    model = timm.create_model(backbone, pretrained=False, num_classes=classes)
    data = timm.data.resolve_data_config({}, model=model)
    return model, list(data["mean"]), list(data["std"])


def train_judge(dataset: str | Path, out: str | Path, *, config: JudgeConfig = JudgeConfig()) -> Judge:
    """Train the judge on the 80 % split of ``dataset``, report accuracy on the 20 %, save to ``out``."""
    device = resolve_device(config.device)
    folder = scan_folder(dataset)
    train, val = split_records(folder.records, seed=config.split_seed)
    torch.manual_seed(config.seed)
    model, mean, std = _build(config.backbone, len(folder.class_names))
    log.warning("judge %s: random init (trained from scratch on %d images)", config.backbone, len(train))
    meta = {"architecture": ARCHITECTURE, "backbone": config.backbone, "classes": list(folder.class_names),
            "image_size": config.image_size, "mean": mean, "std": std, "epochs": config.epochs, "init": "random"}
    judge = Judge(model, meta, device=device)
    data = CaptionDataset(train, image_size=config.image_size, segment_view_prob=config.segment_view_prob, seed=config.seed)
    loader = DataLoader(data, batch_size=config.batch_size, shuffle=True, drop_last=len(data) > config.batch_size,
                        generator=torch.Generator().manual_seed(config.seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    start = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        data.set_epoch(epoch)
        model.train()
        for pixels, labels in progress_bar(loader, desc=f"judge epoch {epoch}/{config.epochs}", enabled=config.progress, leave=False):
            loss = F.cross_entropy(judge.logits(pixels), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    meta["val_accuracy"] = held_out_accuracy(judge, val, config.segment_view_prob)
    meta["seconds"] = round(time.perf_counter() - start, 1)
    save_judge(judge, out)
    return judge


def held_out_accuracy(judge: Judge, records, segment_view_prob: float) -> float:
    """Top-1 accuracy on ``records`` (whole images and, with masks, every other one cut out)."""
    data = CaptionDataset(records, image_size=judge.image_size, segment_view_prob=segment_view_prob, random=False)
    hits = 0
    for pixels, labels in DataLoader(data, batch_size=128):
        hits += int(judge.classify(pixels).eq(labels).sum())
    return hits / max(len(data), 1)


def save_judge(judge: Judge, out: str | Path) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in judge.model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(judge.meta, indent=2))
    return out


def load_judge(path: str | Path, *, device: str | torch.device = "auto") -> Judge:
    """A :class:`Judge` from a directory written by :func:`train_judge`."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        meta = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise WeightsNotFoundError(f"no judge in {path}: cannot read config.json ({e}); train one with `slip train-judge`") from e
    if meta.get("architecture") != ARCHITECTURE:
        raise WeightsError(f"{path / 'config.json'} is not a {ARCHITECTURE} checkpoint")
    model, _, _ = _build(meta["backbone"], len(meta["classes"]))
    try:
        model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    except (OSError, RuntimeError) as e:
        raise WeightsError(f"cannot load the judge weights in {path}: {str(e).splitlines()[0]}") from e
    return Judge(model, meta, device=resolve_device(device))
