"""Data records passed between the pipeline stages.

Conventions used everywhere in ``slip``:

* images are ``(H, W, 3) uint8`` RGB numpy arrays;
* masks are ``(N, H, W) bool`` tensors at image resolution;
* boxes in tensors are ``XYXY`` float pixels; boxes in output records are ``XYWH`` (SAM / COCO style);
* embeddings are ``(N, D)`` float tensors with unit L2 norm.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass(frozen=True)
class MaskSet:
    """Candidate segments of one image, kept as tensors on the model's device."""

    masks: torch.Tensor  # (N, H, W) bool, image resolution
    boxes: torch.Tensor  # (N, 4) float, XYXY pixels, tight box of each mask
    predicted_iou: torch.Tensor  # (N,) float, SAM's IoU prediction
    stability_score: torch.Tensor  # (N,) float, SAM's stability score
    point_coords: torch.Tensor  # (N, 2) float, XY pixels of the prompting point
    crop_boxes: torch.Tensor  # (N, 4) float, XYWH pixels of the crop that produced the mask

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of the image the masks belong to."""
        return int(self.masks.shape[1]), int(self.masks.shape[2])

    @property
    def areas(self) -> torch.Tensor:
        """``(N,)`` int64 pixel count of each mask."""
        return self.masks.flatten(1).sum(1)

    def select(self, index: torch.Tensor) -> "MaskSet":
        """Rows ``index`` (a ``(K,)`` int64 or ``(N,)`` bool tensor), in that order."""
        return MaskSet(
            masks=self.masks[index],
            boxes=self.boxes[index],
            predicted_iou=self.predicted_iou[index],
            stability_score=self.stability_score[index],
            point_coords=self.point_coords[index],
            crop_boxes=self.crop_boxes[index],
        )

    def with_masks(self, masks: torch.Tensor) -> "MaskSet":
        """Same records with new ``(N, H, W) bool`` masks; boxes are recomputed from them."""
        from torchvision.ops import masks_to_boxes

        boxes = masks_to_boxes(masks).to(self.boxes.dtype) if len(masks) else self.boxes[:0]
        return replace(self, masks=masks, boxes=boxes)

    def to(self, device: torch.device | str) -> "MaskSet":
        """A copy on ``device``."""
        return MaskSet(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    @staticmethod
    def empty(height: int, width: int, device: torch.device | str = "cpu") -> "MaskSet":
        """A set with no segments for an ``height x width`` image."""
        z = torch.zeros
        return MaskSet(
            masks=z((0, height, width), dtype=torch.bool, device=device),
            boxes=z((0, 4), device=device),
            predicted_iou=z((0,), device=device),
            stability_score=z((0,), device=device),
            point_coords=z((0, 2), device=device),
            crop_boxes=z((0, 4), device=device),
        )


@dataclass(frozen=True)
class FilterStat:
    """What one annotation filter did."""

    name: str  # filter name, e.g. "containment"
    params: dict  # its parameters, JSON-serialisable
    before: int  # segments in
    removed: int  # segments removed (0 for filters that only reshape masks)


@dataclass(frozen=True)
class Proposals:
    """Filtered SAM proposals of one image: prompt-independent, so they can be cached."""

    segments: MaskSet  # the kept segments
    filter_stats: tuple[FilterStat, ...]  # one per filter, in order
    generated: int  # segments the mask generator produced before filtering


@dataclass(frozen=True)
class Match:
    """The answer for one prompt: zero, one or several segments (instances), best first.

    ``instances == ()`` is an explicit "not found" (nothing passed the threshold, or no segments).
    """

    prompt: str
    instances: tuple[tuple[int, float], ...]  # chosen (segment index, cosine similarity), best first; () = not found
    best: tuple[int, float] | None  # best-scoring segment whatever the threshold; None = no segments
    threshold: float | None  # the similarity threshold applied to this prompt; None = none
    top_k: tuple[tuple[int, float], ...]  # (segment index, similarity) of the plain ranking, best first

    @property
    def index(self) -> int | None:
        """Row of the first (best) instance in ``Proposals.segments``; None = not found."""
        return self.instances[0][0] if self.instances else None

    @property
    def score(self) -> float | None:
        """Similarity of the first instance, else of the best candidate; None when there are no segments."""
        if self.instances:
            return self.instances[0][1]
        return None if self.best is None else self.best[1]

    @property
    def matched(self) -> bool:
        return bool(self.instances)


@dataclass(frozen=True)
class SlipResult:
    """Everything the pipeline computed for one image and a list of prompts."""

    image_size: tuple[int, int]  # (H, W) pixels
    proposals: Proposals
    similarity: torch.Tensor  # (N, P) float, segments x prompts cosine similarity, on CPU
    matches: tuple[Match, ...]  # one per prompt, in prompt order
    timings: dict[str, float] = field(default_factory=dict)  # stage name -> seconds
