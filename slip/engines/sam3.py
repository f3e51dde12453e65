"""SAM 3 concept segmentation: every instance of a text prompt, with its score and a presence score.

SAM 3 runs in two parts, and :class:`Sam3Concepts` keeps them apart so a new prompt costs only the second:

1. **vision** (prompt-independent, :meth:`Sam3Concepts.vision`): the ViT backbone + FPN neck on the image
   resized to the model's input (1008 px): a :class:`Sam3Vision`, cached in process (LRU by image digest) and
   serialisable (:meth:`Sam3Vision.to_bytes`) for a store;
2. **concepts** (per prompt, :meth:`Sam3Concepts.concepts`): the text encoder (embeddings cached per prompt),
   the DETR encoder (image tokens attend to the prompt), the DETR decoder (200 queries, boxes, a presence
   token) and the mask decoder; prompts run batched against one copy of the vision features.

Each query's score is ``sigmoid(logit) * sigmoid(presence)`` (``Sam3Processor.post_process_instance_segmentation``):
the presence score ("is the concept here at all") scales every instance, so a concept absent from the image
has no instance above a threshold. Masks: the kept queries' ``(4g, 4g)`` logits (g = input / 14), sigmoid,
bilinear to the image size, ``> 0.5``.

Answers come from :func:`slip.rankers.scores.rank_scores` (the pipeline's rules over SAM 3's scores).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from slip.device import resolve_dtype
from slip.engines.sam3_model import TEXT_TOKENS, Sam3Bundle
from slip.timing import StageTimer
from slip.types import MaskSet

CANDIDATE_SCORE = 0.05  # queries scored below this are not kept as candidates (the best one always is)
MAX_CANDIDATES = 100  # per prompt, best first
MASK_PROBABILITY = 0.5  # a pixel is in the mask when sigmoid(logit) > this (Sam3Processor's mask_threshold)


@dataclass(frozen=True)
class Sam3Vision:
    """SAM 3's prompt-independent features of one image."""

    fpn: tuple[torch.Tensor, ...]  # FPN levels, (1, C, h_i, w_i) each, finest first
    positions: tuple[torch.Tensor, ...]  # their positional encodings, same shapes
    image_size: tuple[int, int]  # (H, W) of the original image

    def to_bytes(self) -> bytes:
        """The features as safetensors bytes (for a store cache)."""
        from safetensors.torch import save

        tensors = {f"fpn.{i}": t.contiguous().cpu() for i, t in enumerate(self.fpn)}
        tensors |= {f"pos.{i}": t.contiguous().cpu() for i, t in enumerate(self.positions)}
        tensors["image_size"] = torch.tensor(self.image_size, dtype=torch.int64)
        return save(tensors)

    @staticmethod
    def from_bytes(data: bytes, device: torch.device | str = "cpu") -> "Sam3Vision":
        from safetensors.torch import load

        tensors = load(data)
        levels = len([k for k in tensors if k.startswith("fpn.")])
        height, width = tensors["image_size"].tolist()
        return Sam3Vision(tuple(tensors[f"fpn.{i}"].to(device) for i in range(levels)),
                          tuple(tensors[f"pos.{i}"].to(device) for i in range(levels)), (int(height), int(width)))


@dataclass(frozen=True)
class Concept:
    """SAM 3's answer for one prompt on one image (every query, best first not implied)."""

    prompt: str
    presence: float  # sigmoid of the presence logit: the concept is in the image at all
    scores: torch.Tensor  # (Q,) float32: sigmoid(query logit) * presence
    boxes: torch.Tensor  # (Q, 4) float32 XYXY pixels of the original image
    mask_logits: torch.Tensor  # (Q, 4g, 4g) float32 low-resolution mask logits


class Sam3Concepts:
    """SAM 3 on images and text prompts, the vision part cached per image and the text part per prompt."""

    def __init__(self, bundle: Sam3Bundle, *, dtype: str = "fp32", image_cache: int = 8, text_cache: int = 1024,
                 prompt_batch: int = 4) -> None:
        self.bundle, self.model, self.processor = bundle, bundle.model, bundle.processor
        self.device = next(self.model.parameters()).device
        self.compute_dtype = resolve_dtype(dtype, self.device)
        self.prompt_batch = prompt_batch  # prompts decoded together (memory: one copy of the decoder maps each)
        self.points_per_batch = prompt_batch  # the name OOM messages use for "work per forward pass"
        self._images: OrderedDict[str, Sam3Vision] = OrderedDict()
        self._texts: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._image_cache, self._text_cache = image_cache, text_cache

    def clear(self) -> None:
        """Forget every cached image and prompt (benchmarks time a first pass with it)."""
        self._images.clear()
        self._texts.clear()

    # --- 1. vision ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def vision(self, image: np.ndarray, timer: StageTimer | None = None) -> Sam3Vision:
        """The prompt-independent features of an ``(H, W, 3) uint8`` image (cached by its digest)."""
        key = image_digest(image)
        if key in self._images:
            self._images.move_to_end(key)
            return self._images[key]
        timer = timer or StageTimer()
        with timer.stage("encode", self.device):
            pixels = self.processor.image_processor(images=image, return_tensors="pt")["pixel_values"]
            with self._autocast():
                out = self.model.get_vision_features(pixel_values=pixels.to(self.device))
        vision = Sam3Vision(tuple(t.float() for t in out.fpn_hidden_states),
                            tuple(t.float() for t in out.fpn_position_encoding), tuple(image.shape[:2]))
        self._images[key] = vision
        while len(self._images) > self._image_cache:
            self._images.popitem(last=False)
        return vision

    # --- 1b. the vision features as stored (the queue's segment-once, query-many cache) -----------------------

    def pack(self, vision: Sam3Vision) -> bytes:
        """The features as the queue stores them: safetensors of the FPN levels the text path reads (every level
        but the last; its positional encodings are recomputed) in fp16, plus the image size. The real SAM 3
        (256 channels at 288, 144 and 72 px) packs to about 56 MB per image; tiny-random-sam3 to about 7 MB."""
        from safetensors.torch import save

        tensors = {f"fpn.{i}": t.detach().to("cpu", torch.float16).contiguous() for i, t in enumerate(vision.fpn[:-1])}
        tensors["image_size"] = torch.tensor(vision.image_size, dtype=torch.int64)
        return save(tensors)

    def unpack(self, data: bytes) -> Sam3Vision:
        """:meth:`pack`'s bytes back as features on this model's device (fp32): the positional encodings are
        recomputed (they depend only on the level's shape) and the last level, which the text path never reads,
        is a stand-in. ``unpack(pack(v))`` answers like ``v`` up to fp16 rounding; the queue always answers
        from packed features, so a result does not depend on where its features came from."""
        from safetensors.torch import load

        tensors = load(data)
        levels = [tensors[f"fpn.{i}"].to(self.device, torch.float32) for i in range(len(tensors) - 1)]
        encode = self.model.vision_encoder.neck.position_encoding
        positions = [encode(t.shape, t.device, torch.float32) for t in levels]
        height, width = tensors["image_size"].tolist()
        return Sam3Vision((*levels, levels[-1]), (*positions, positions[-1]), (int(height), int(width)))

    # --- 2. concepts ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def concepts(self, vision: Sam3Vision, prompts: Sequence[str], timer: StageTimer | None = None) -> list[Concept]:
        """Every query of each prompt on the image of ``vision``; prompts run ``prompt_batch`` at a time."""
        timer = timer or StageTimer()
        out: list[Concept] = []
        for start in range(0, len(prompts), self.prompt_batch):
            part = list(prompts[start : start + self.prompt_batch])
            with timer.stage("clip_text", self.device):
                text, mask = self._text(part)
            with timer.stage("decode", self.device):
                out += self._decode(vision, part, text, mask)
        return out

    def _decode(self, vision: Sam3Vision, prompts: list[str], text: torch.Tensor, mask: torch.Tensor) -> list[Concept]:
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

        p = len(prompts)
        embeds = Sam3VisionEncoderOutput(
            last_hidden_state=None,
            fpn_hidden_states=tuple(t.expand(p, -1, -1, -1) for t in vision.fpn),
            fpn_position_encoding=tuple(t.expand(p, -1, -1, -1) for t in vision.positions),
        )
        with self._autocast():
            result = self.model(vision_embeds=embeds, text_embeds=BaseModelOutputWithPooling(pooler_output=text),
                                attention_mask=mask)
        presence = result.presence_logits.float().sigmoid()  # (P, 1)
        scores = result.pred_logits.float().sigmoid() * presence  # (P, Q)
        height, width = vision.image_size
        scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=scores.device)
        boxes = result.pred_boxes.float() * scale  # normalised XYXY -> pixels
        return [Concept(prompt, float(presence[i, 0]), scores[i], boxes[i], result.pred_masks[i].float())
                for i, prompt in enumerate(prompts)]

    def _text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P, T, C)`` projected text features and ``(P, T)`` attention mask, one prompt computed once."""
        missing = [t for t in dict.fromkeys(prompts) if t not in self._texts]
        if missing:
            tokens = self.processor.tokenizer(missing, return_tensors="pt", padding="max_length",
                                              max_length=TEXT_TOKENS, truncation=True)
            ids, mask = tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
            with self._autocast():
                features = self.model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
            for i, prompt in enumerate(missing):
                self._texts[prompt] = (features[i].float(), mask[i])
        for prompt in prompts:
            self._texts.move_to_end(prompt)
        rows = [self._texts[t] for t in prompts]
        while len(self._texts) > self._text_cache:
            self._texts.popitem(last=False)
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    def _autocast(self):
        enabled = self.compute_dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=enabled)


def instances(concept: Concept, image_size: tuple[int, int], *, floor: float = CANDIDATE_SCORE,
              limit: int = MAX_CANDIDATES) -> MaskSet:
    """The kept queries of a concept as full-resolution segments, best first: scores ``>= floor`` (at most
    ``limit``; the best query always), masks ``sigmoid > 0.5`` after bilinear upscaling, empty masks dropped.

    ``predicted_iou`` holds the score, ``stability_score`` the presence, ``point_coords`` the box centre,
    ``crop_boxes`` the whole image (XYWH)."""
    order = torch.argsort(concept.scores, descending=True, stable=True)
    keep = order[concept.scores[order] >= floor][:limit]
    if len(keep) == 0:
        keep = order[:1]
    height, width = image_size
    probs = concept.mask_logits[keep].sigmoid()[None]
    masks = F.interpolate(probs, size=(height, width), mode="bilinear", align_corners=False)[0] > MASK_PROBABILITY
    nonempty = masks.flatten(1).any(1)
    keep, masks = keep[nonempty], masks[nonempty]
    from torchvision.ops import masks_to_boxes

    boxes = masks_to_boxes(masks) if len(masks) else torch.zeros((0, 4), device=masks.device)
    n = len(keep)
    scores = concept.scores[keep]
    return MaskSet(
        masks=masks,
        boxes=boxes,
        predicted_iou=scores,
        stability_score=torch.full((n,), concept.presence, device=masks.device),
        point_coords=(boxes[:, :2] + boxes[:, 2:]) / 2,
        crop_boxes=torch.tensor([[0.0, 0.0, float(width), float(height)]], device=masks.device).expand(n, 4).clone(),
    )


def image_digest(image: np.ndarray) -> str:
    """SHA-256 of an image's shape and pixels (the in-process cache key)."""
    digest = hashlib.sha256(f"{image.shape}|{image.dtype}|".encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()
