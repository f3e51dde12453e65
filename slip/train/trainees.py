"""Adapters that give the trainer one interface over the trainable ranker families.

A :class:`Trainee` owns a ``torch.nn.Module`` and knows its parameter groups, its features, its loss
and its checkpoint format:

* :func:`dual_encoder_trainee` — the paper's dual encoder (:mod:`slip.rankers.dual_encoder`), loss
  :func:`~slip.train.contrastive.paper_clip_loss`, saved as a ``slip-dual-encoder`` directory;
* :func:`clip_trainee` — a Hugging Face ``CLIPModel``, CLIP's symmetric loss, saved as a standard
  Hugging Face CLIP directory (plus ``slip_training.json``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from slip.errors import ConfigError
from slip.rankers.dual_encoder import DualEncoder, DualEncoderRanker, save_dual_encoder
from slip.train.contrastive import paper_clip_loss, symmetric_clip_loss

Features = Callable[..., torch.Tensor]


@dataclass
class Trainee:
    """A trainable ranker; features are unnormalised ``(B, D)`` float tensors."""

    module: nn.Module  # all trainable weights
    tokenizer: object  # a transformers tokenizer
    image_size: int  # side in pixels of the crops the image encoder sees
    max_text_tokens: int  # captions are truncated to this many tokens
    image_features: Features  # (B, 3, S, S) float in [0, 1] -> (B, D)
    text_features: Features  # (input_ids (B, T), attention_mask (B, T)) -> (B, D)
    loss_from_features: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (image, text, labels) -> scalar
    groups: Callable[[float, float, float, float], list[dict]]  # (lr, image_lr, text_lr, weight_decay) -> AdamW groups
    save: Callable[..., Path]  # (directory, *, training: dict) -> directory
    as_ranker: Callable[[str], object]  # spec -> a Ranker over the current weights (eval mode)

    def param_groups(self, *, lr: float, image_lr: float, text_lr: float, weight_decay: float) -> list[dict]:
        """AdamW parameter groups; empty groups are dropped, the heads' group is last."""
        return [g for g in self.groups(lr, image_lr, text_lr, weight_decay) if g["params"]]

    def caption_features(self, labels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` features of the captions of ``labels`` given every class's tokens ``(C, T)``.

        Each distinct caption in the batch goes through the text encoder once (captions repeat: one per
        class), then rows are gathered; gradients reach the encoder exactly as with duplicated rows.
        """
        unique, inverse = labels.unique(return_inverse=True)
        return self.text_features(input_ids[unique], attention_mask[unique])[inverse]

    def loss(self, pixels: torch.Tensor, labels: torch.Tensor, input_ids: torch.Tensor,
             attention_mask: torch.Tensor) -> torch.Tensor:
        """Scalar loss of a batch: ``pixels (B, 3, S, S)``, ``labels (B,)``, class tokens ``(C, T)``."""
        return self.loss_from_features(self.image_features(pixels), self.caption_features(labels, input_ids, attention_mask), labels)


LOSSES = ("paper", "clip")  # the dual encoder's training losses


class LogitScale(nn.Module):
    """CLIP's learnt temperature, ``exp(logit_scale)``: a training-only parameter, never saved (rankers
    compare unit-norm embeddings, where a common scale does not change any ranking)."""

    def __init__(self, initial: float = 1 / 0.07) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(initial)))


def dual_encoder_trainee(model: DualEncoder, tokenizer, *, init: dict | None = None, loss: str = "paper") -> Trainee:
    """The paper's dual encoder with the paper's loss (temperature 1, soft targets), or with CLIP's
    (``loss="clip"``: unit-norm embeddings, learnt temperature, targets spread over same-class pairs)."""
    if loss not in LOSSES:
        raise ConfigError(f"unknown dual-encoder loss {loss!r}: use one of {', '.join(LOSSES)}")
    scale = LogitScale() if loss == "clip" else None
    module = nn.ModuleDict({"model": model, "scale": scale}) if scale is not None else model

    def loss_from_features(image, text, labels):
        if scale is None:
            return paper_clip_loss(image, text)
        return symmetric_clip_loss(image, text, scale.logit_scale, labels)

    def groups(lr, image_lr, text_lr, weight_decay):
        learnt_scale = [] if scale is None else [{"params": [scale.logit_scale], "lr": lr, "weight_decay": 0.0,
                                                  "name": "logit_scale"}]
        return learnt_scale + [
            {"params": list(model.image_encoder.parameters()), "lr": image_lr, "weight_decay": 0.0, "name": "image"},
            {"params": [p for p in model.text_encoder.parameters() if p.requires_grad], "lr": text_lr,
             "weight_decay": 0.0, "name": "text"},  # empty (dropped) when the text encoder is frozen
            {"params": model.head_parameters(), "lr": lr, "weight_decay": weight_decay, "name": "heads"},
        ]

    return Trainee(
        module=module,
        tokenizer=tokenizer,
        image_size=model.config.image_size,
        max_text_tokens=model.config.max_text_tokens,
        image_features=model.image_features,
        text_features=model.text_features,
        loss_from_features=loss_from_features,
        groups=groups,
        save=lambda directory, *, training: save_dual_encoder(model, tokenizer, directory, init=init, training=training),
        as_ranker=lambda spec: DualEncoderRanker(model, tokenizer, spec=spec, device=next(model.parameters()).device),
    )


def clip_trainee(ranker) -> Trainee:
    """A Hugging Face CLIP (an :class:`~slip.rankers.hf_clip.HFClipRanker`'s model) with CLIP's loss."""
    from slip.rankers.hf_clip import HFClipRanker, save_hf_clip

    model = ranker.model.float()
    side = ranker.image_size
    mean, std = list(ranker.pixel_mean), list(ranker.pixel_std)  # the ranker's pixel normalisation (RGB in [0, 1])
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    def image_features(pixels):
        if pixels.shape[-2:] != (side, side):
            pixels = F.interpolate(pixels, size=(side, side), mode="bicubic", antialias=True, align_corners=False)
        x = (pixels - mean_t.to(pixels.device)) / std_t.to(pixels.device)
        return _tensor(model.get_image_features(pixel_values=x))

    def text_features(input_ids, attention_mask):
        return _tensor(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))

    def groups(lr, image_lr, text_lr, weight_decay):
        heads = [*model.visual_projection.parameters(), *model.text_projection.parameters(), model.logit_scale]
        return [
            {"params": list(model.vision_model.parameters()), "lr": image_lr, "weight_decay": 0.0, "name": "image"},
            {"params": list(model.text_model.parameters()), "lr": text_lr, "weight_decay": 0.0, "name": "text"},
            {"params": heads, "lr": lr, "weight_decay": weight_decay, "name": "heads"},
        ]

    def save(directory, *, training):
        save_hf_clip(model, ranker.tokenizer, Path(directory), mean=mean, std=std)
        (Path(directory) / "slip_training.json").write_text(json.dumps(training, indent=2, default=str))
        return Path(directory)

    max_tokens = min(int(getattr(ranker.tokenizer, "model_max_length", 77)), model.config.text_config.max_position_embeddings)
    return Trainee(
        module=model,
        tokenizer=ranker.tokenizer,
        image_size=side,
        max_text_tokens=max_tokens,
        image_features=image_features,
        text_features=text_features,
        loss_from_features=lambda image, text, labels: symmetric_clip_loss(image, text, model.logit_scale, labels),
        groups=groups,
        save=save,
        as_ranker=lambda spec: HFClipRanker(model, ranker.tokenizer, spec=spec, device=next(model.parameters()).device,
                                            mean=mean, std=std),
    )


def _tensor(output) -> torch.Tensor:
    """transformers 5 returns a model output whose ``pooler_output`` is the projection; 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def trainee_from_spec(spec: str, *, cache_dir: Path | None = None, loss: str = "paper") -> Trainee:
    """Fine-tune an existing ranker: a dual-encoder directory, a HF CLIP (hub id / directory) or tiny-random.

    ``loss`` applies to a dual encoder; a Hugging Face CLIP always trains with CLIP's own loss."""
    from slip.rankers.hf_clip import HFClipRanker
    from slip.rankers.loading import load_ranker

    ranker = load_ranker(spec, device="cpu", cache_dir=cache_dir)
    if isinstance(ranker, DualEncoderRanker):
        return dual_encoder_trainee(ranker.model, ranker.tokenizer, init={"from": spec}, loss=loss)
    if isinstance(ranker, HFClipRanker):
        return clip_trainee(ranker)
    raise ConfigError(f"ranker {spec!r} ({type(ranker).__name__}) cannot be fine-tuned: use a Hugging Face CLIP "
                      "or a slip-dual-encoder directory")
