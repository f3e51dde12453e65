"""One batched SAM training step: prompts -> masks for a batch of images, and the loss.

The official ``Sam.forward`` and ``SamPredictor`` handle one image at a time; training here runs the
``Sam`` modules directly on a batch: the image encoder on ``(B, 3, S, S)`` preprocessed images, the
prompt encoder on all prompts of the batch at once, and the mask decoder (:func:`decode`) on each
prompt with its own image's embedding. Point prompts use the three multimask outputs (the loss takes the
best of the three, as SAM trains ambiguous prompts); box prompts use the single-mask output.

Loss per prompt (SAM's recipe): ``focal_weight * focal + dice_weight * dice`` on the mask logits at
``loss_size`` pixels, plus ``iou_weight * MSE(predicted IoU, actual IoU)`` for every output. Background
point prompts (target: an empty mask) average the mask loss over the three outputs and regress IoU to 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, Sam

from slip.errors import DatasetError
from slip.train.sam_data import (
    InstanceBank,
    InstanceImage,
    Prompt,
    PromptConfig,
    SceneConfig,
    build_scene,
    letterbox,
    sample_prompts,
)


@dataclass(frozen=True)
class PromptBatch:
    """Images and prompts of one step; prompts are ordered points first, then boxes."""

    images: torch.Tensor  # (B, 3, S, S) float32 RGB pixels in [0, 255], padded scenes
    image_index: torch.Tensor  # (N,) int64, batch row of each prompt's image
    points: torch.Tensor  # (Np, 1, 2) float32 XY pixels, one positive point per prompt
    boxes: torch.Tensor  # (Nb, 4) float32 XYXY pixels
    targets: torch.Tensor  # (N, S, S) bool ground-truth mask of each prompt (all False: background)
    background: torch.Tensor  # (N,) bool, prompts whose target is background

    @property
    def num_points(self) -> int:
        return int(self.points.shape[0])

    def to(self, device: torch.device) -> "PromptBatch":
        return PromptBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


@dataclass(frozen=True)
class StepOutput:
    """Mask logits and IoU predictions of every prompt of a batch."""

    point_logits: torch.Tensor  # (Np, 3, h, w) multimask low-res logits
    point_iou: torch.Tensor  # (Np, 3) predicted IoU
    box_logits: torch.Tensor  # (Nb, 1, h, w) single-mask low-res logits
    box_iou: torch.Tensor  # (Nb, 1)


def collate(scenes: Sequence[InstanceImage], prompts: Sequence[Sequence[Prompt]]) -> PromptBatch:
    """Stack scenes (all ``S x S``) and their prompts into tensors."""
    size = scenes[0].image.shape[0]
    images = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float()
    flat = [(b, p) for b, ps in enumerate(prompts) for p in ps]
    ordered = [x for x in flat if x[1].kind == "point"] + [x for x in flat if x[1].kind == "box"]
    empty = np.zeros((size, size), bool)
    targets = [scenes[b].masks[p.target] if p.target >= 0 else empty for b, p in ordered]
    points = [p.coords for _, p in ordered if p.kind == "point"]
    boxes = [p.coords for _, p in ordered if p.kind == "box"]
    return PromptBatch(
        images=images,
        image_index=torch.tensor([b for b, _ in ordered], dtype=torch.int64),
        points=torch.tensor(points, dtype=torch.float32).reshape(-1, 1, 2),
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        targets=torch.from_numpy(np.stack(targets)) if targets else torch.zeros((0, size, size), dtype=torch.bool),
        background=torch.tensor([p.target < 0 for _, p in ordered], dtype=torch.bool),
    )


def predict(sam: Sam, batch: PromptBatch, *, train_image_encoder: bool, bf16: bool = False) -> StepOutput:
    """Batched forward of all prompts; gradients flow into the image encoder only when asked.
    ``bf16`` runs the modules under bfloat16 autocast; the outputs are float32 either way."""
    with torch.autocast(batch.images.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = _forward(sam, batch, train_image_encoder)
    return StepOutput(*(t.float() for t in (out.point_logits, out.point_iou, out.box_logits, out.box_iou)))


def _forward(sam: Sam, batch: PromptBatch, train_image_encoder: bool) -> StepOutput:
    x = torch.stack([sam.preprocess(image) for image in batch.images])
    with torch.set_grad_enabled(train_image_encoder and torch.is_grad_enabled()):
        embeddings = sam.image_encoder(x)  # (B, C, g, g)
    sparse = []
    if batch.num_points:
        labels = torch.ones(batch.points.shape[:2], device=batch.points.device)
        sparse.append(sam.prompt_encoder(points=(batch.points, labels), boxes=None, masks=None)[0])
    if batch.boxes.shape[0]:
        sparse.append(sam.prompt_encoder(points=None, boxes=batch.boxes, masks=None)[0])
    sparse_all = torch.cat(sparse)  # (N, 2, C): point + padding point, or two box corners
    dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
    logits, iou = decode(sam.mask_decoder, sam.prompt_encoder.get_dense_pe(), embeddings[batch.image_index],
                         sparse_all, dense)
    n = batch.num_points
    return StepOutput(logits[:n, 1:], iou[:n, 1:], logits[n:, :1], iou[n:, :1])


def decode(decoder: MaskDecoder, image_pe: torch.Tensor, embeddings: torch.Tensor, sparse: torch.Tensor,
           dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``MaskDecoder.predict_masks`` with one image embedding per prompt instead of one per call.

    ``embeddings (N, C, g, g)``, ``image_pe (1, C, g, g)``, ``sparse (N, T, C)``, ``dense`` broadcastable
    to ``(N, C, g, g)``. Returns all ``1 + num_multimask_outputs`` outputs: logits ``(N, 4, 4g, 4g)`` and
    predicted IoU ``(N, 4)``.
    """
    out_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((out_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1), sparse), dim=1)
    src = embeddings + dense
    b, c, h, w = src.shape
    hs, src = decoder.transformer(src, image_pe.expand(b, -1, -1, -1), tokens)
    iou_token_out, mask_tokens_out = hs[:, 0, :], hs[:, 1 : 1 + decoder.num_mask_tokens, :]
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], 1)
    b, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
    return masks, decoder.iou_prediction_head(iou_token_out)


# --- loss ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms (SAM: focal 20, dice 1, IoU 1)."""

    focal: float = 20.0  # sigmoid focal loss (alpha 0.25, gamma 2), mean over pixels
    dice: float = 1.0  # soft dice loss
    iou: float = 1.0  # MSE between predicted and actual IoU


def resize_logits(logits: torch.Tensor, size: int) -> torch.Tensor:
    """Low-res logits ``(N, M, h, w)`` -> ``(N, M, size, size)`` (bilinear, as ``Sam.postprocess_masks``)."""
    if logits.shape[-1] == size:
        return logits
    return F.interpolate(logits, (size, size), mode="bilinear", align_corners=False)


def resize_targets(targets: torch.Tensor, size: int) -> torch.Tensor:
    """Boolean masks ``(N, S, S)`` -> float ``(N, 1, size, size)``: the covered fraction of each pixel
    (area resampling keeps sub-pixel boundaries when ``size < S``)."""
    t = targets[:, None].float()
    return t if t.shape[-1] == size else F.interpolate(t, (size, size), mode="area")


def mask_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU of ``logits > 0`` with ``targets`` ``(N, 1, s, s)``: ``(N, M)``; empty vs empty counts 1."""
    pred = logits > 0
    t = targets > 0.5
    inter = (pred & t).flatten(2).sum(-1).float()
    union = (pred | t).flatten(2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def _focal(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """``(N, M)`` sigmoid focal loss, mean over pixels."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets.expand_as(logits), reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss.flatten(2).mean(-1)


def _dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(N, M)`` soft dice loss."""
    p = torch.sigmoid(logits).flatten(2)
    t = targets.flatten(2)
    return 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)


def _prompt_losses(logits: torch.Tensor, iou_pred: torch.Tensor, targets: torch.Tensor, background: torch.Tensor,
                   weights: LossWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt mask loss (best output; mean for background) and IoU loss, both ``(N,)``."""
    per_output = weights.focal * _focal(logits, targets) + weights.dice * _dice(logits, targets)
    mask_loss = torch.where(background, per_output.mean(1), per_output.min(1).values)
    with torch.no_grad():
        actual = torch.where(background[:, None], torch.zeros_like(iou_pred), mask_iou(logits, targets))
    return mask_loss, ((iou_pred - actual) ** 2).mean(1)


def batch_loss(out: StepOutput, batch: PromptBatch, *, size: int, weights: LossWeights) -> tuple[torch.Tensor, dict]:
    """Mean loss over the batch's prompts, and its parts as floats."""
    targets = resize_targets(batch.targets, size)
    n = batch.num_points
    parts = [
        _prompt_losses(resize_logits(out.point_logits, size), out.point_iou, targets[:n], batch.background[:n], weights),
        _prompt_losses(resize_logits(out.box_logits, size), out.box_iou, targets[n:], batch.background[n:], weights),
    ]
    mask = torch.cat([p[0] for p in parts]).mean()
    iou = torch.cat([p[1] for p in parts]).mean()
    return mask + weights.iou * iou, {"mask_loss": float(mask.detach()), "iou_loss": float(iou.detach())}


def chosen_iou(out: StepOutput, batch: PromptBatch, *, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU with the target of the mask SAM would return: for points the output with the highest predicted
    IoU, for boxes the single output. ``(Np,)`` and ``(Nb,)``."""
    targets = resize_targets(batch.targets, size)
    n = batch.num_points
    best = out.point_iou.argmax(1)
    point_logits = out.point_logits[torch.arange(n, device=best.device), best][:, None]
    point = mask_iou(resize_logits(point_logits, size), targets[:n])[:, 0]
    box = mask_iou(resize_logits(out.box_logits, size), targets[n:])[:, 0]
    return point, box


# --- validation ------------------------------------------------------------------------------------------


def validation_batches(bank: InstanceBank, scenes: SceneConfig, *, count: int, batch_images: int,
                       seed: int) -> list[PromptBatch]:
    """Fixed (seeded) validation scenes with one point and one unjittered box prompt per object.
    Plain scene recipes (no composites or pastes) use the first ``count`` bank images as they are."""
    rng = np.random.default_rng([seed, 10_000])
    if scenes.composite_prob == 0 and scenes.max_pastes == 0:
        built = [letterbox(bank[i], scenes.size) for i in range(min(count, len(bank)))]
    else:
        built = [build_scene(bank, rng, scenes) for _ in range(count)]
    points = PromptConfig(point_fraction=1.0, background_fraction=0.0)
    boxes = PromptConfig(point_fraction=0.0, background_fraction=0.0, box_jitter=0.0)
    batches = []
    for i in range(0, len(built), batch_images):
        chunk = [s for s in built[i : i + batch_images] if len(s.masks)]
        if chunk:
            batches.append(collate(chunk, [sample_prompts(s, len(s.masks), rng, points)
                                           + sample_prompts(s, len(s.masks), rng, boxes) for s in chunk]))
    if not batches:
        raise DatasetError(f"no validation scene of {bank.name} holds an object")
    return batches


@torch.no_grad()
def evaluate(sam: Sam, batches: Sequence[PromptBatch], device: torch.device, *, size: int,
             weights: LossWeights) -> dict:
    """Validation loss and mIoU (at ``size`` pixels) of the mask SAM would return: for points the
    output with the highest predicted IoU, for boxes the single output. Runs in float32."""
    sam.eval()
    losses, point_ious, box_ious = [], [], []
    for batch in batches:
        batch = batch.to(device)
        out = predict(sam, batch, train_image_encoder=False)
        loss, _ = batch_loss(out, batch, size=size, weights=weights)
        point, box = chosen_iou(out, batch, size=size)
        losses.append(float(loss)), point_ious.append(point.cpu()), box_ious.append(box.cpu())
    point_all, box_all = torch.cat(point_ious), torch.cat(box_ious)
    return {"val_loss": float(np.mean(losses)), "val_miou": float(torch.cat([point_all, box_all]).mean()),
            "val_point_miou": float(point_all.mean()), "val_box_miou": float(box_all.mean())}
