"""A torch ``Dataset`` of ``(pixels, caption id)`` pairs over labelled image records.

The caption id is the class label: the caption of label ``c`` is ``LabelledFolder.captions[c]``, so
captions are tokenised once per class, not once per image (see :func:`caption_tokens`).

Two views of an image:

* the whole image, resized (stretched) to ``image_size x image_size``, as in the paper;
* for images with a ground-truth mask, the *segment view*: the object cut out on black, tight square
  box, exactly what the pipeline's default :class:`~slip.crops.CropConfig` hands the ranker at
  inference. Training on both views closes the gap between training images and SAM segment crops.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from slip.crops import CropConfig, crop_segments
from slip.data.folder import ImageRecord, load_mask, load_rgb
from slip.types import MaskSet


def maskset_from_masks(masks: torch.Tensor | np.ndarray) -> MaskSet:
    """A :class:`MaskSet` for known ``(N, H, W) bool`` masks (oracle proposals, training cut-outs).

    Scores are 1, the prompting point is each mask's centroid, the crop box the whole image.
    """
    masks = torch.as_tensor(masks, dtype=torch.bool)
    n, h, w = masks.shape
    base = MaskSet.empty(h, w, device=masks.device)
    counts = masks.flatten(1).sum(1).clamp_min(1).float()
    ys = torch.arange(h, dtype=torch.float32, device=masks.device)
    xs = torch.arange(w, dtype=torch.float32, device=masks.device)
    cx = (masks.sum(1).float() * xs).sum(1) / counts
    cy = (masks.sum(2).float() * ys).sum(1) / counts
    full = torch.tensor([0.0, 0.0, float(w), float(h)], device=masks.device).expand(n, 4).clone()
    ones = torch.ones(n, device=masks.device)
    seed = MaskSet(masks=base.masks, boxes=base.boxes, predicted_iou=ones, stability_score=ones.clone(),
                   point_coords=torch.stack([cx, cy], 1), crop_boxes=full)
    return seed.with_masks(masks)


def resize_image(image: np.ndarray, size: int) -> torch.Tensor:
    """``(H, W, 3) uint8`` -> ``(3, size, size)`` float32 in ``[0, 1]`` (stretched, antialiased bilinear)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x[0].clamp_(0.0, 1.0)


def segment_view(image: np.ndarray, mask: np.ndarray, size: int, *, padding: float = 0.0) -> torch.Tensor:
    """The object of ``image`` cut out on black (tight square box + ``padding``) -> ``(3, size, size)``."""
    crop = CropConfig(background="black", padding=padding, square=True)
    return crop_segments(image, maskset_from_masks(torch.from_numpy(mask)[None]), crop, size)[0]


class CaptionDataset(Dataset):
    """Item ``i`` -> ``(pixels (3, S, S) float32 in [0, 1], label int)``.

    ``segment_view_prob``: probability of the segment view for an image that has a mask. With
    ``random=True`` the choice (and a 0-10 % padding jitter) is drawn from a generator seeded by
    ``(seed, epoch, i)`` — call :meth:`set_epoch` each epoch; with ``random=False`` the odd items take
    the segment view, so validation is deterministic and still sees both views.
    """

    def __init__(self, records: Sequence[ImageRecord], *, image_size: int, segment_view_prob: float = 0.0,
                 random: bool = True, seed: int = 0) -> None:
        self.records = tuple(records)
        self.image_size = image_size
        self.segment_view_prob = segment_view_prob
        self.random = random
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> list[int]:
        return [r.label for r in self.records]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        record = self.records[i]
        image = load_rgb(record.path)
        if record.mask_path is not None and self.segment_view_prob > 0:
            if self.random:
                rng = np.random.default_rng([self.seed, self.epoch, i])
                cut, padding = rng.uniform() < self.segment_view_prob, float(rng.uniform(0.0, 0.1))
            else:
                cut, padding = i % 2 == 1, 0.0
            if cut:
                mask = load_mask(record.mask_path, image.shape[:2])
                if mask.any():
                    return segment_view(image, mask, self.image_size, padding=padding), record.label
        return resize_image(image, self.image_size), record.label


def caption_tokens(tokenizer, captions: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every class caption tokenised once: ``(input_ids, attention_mask)``, both ``(C, T)`` int64."""
    tokens = tokenizer(list(captions), padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
    return tokens["input_ids"], tokens["attention_mask"]
