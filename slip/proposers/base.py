"""The proposer interface: an image in, filtered segment proposals out.

A proposer is a mask source (anything with ``generate_masks(image, *, timings) -> MaskSet``: SAM 1's
:class:`slip.generator.MaskGenerator`, SAM 2's :class:`slip.proposers.sam2_generator.Sam2MaskGenerator`, EdgeTAM's
and the SAM 3 tracker's :class:`slip.proposers.hf_tracker_generator.HfTrackerMaskGenerator`, SAM 3
prompted with one generic concept, :class:`slip.proposers.sam3.Sam3Proposer`) followed by the annotation filter
chain. :meth:`Proposer.propose` returns :class:`slip.types.Proposals` (tensors, prompt-independent, cacheable);
:func:`proposal_records` turns them into the stored form: COCO RLE, XYWH boxes, scores.

Shapes: image ``(H, W, 3) uint8`` RGB; masks ``(N, H, W) bool``; boxes in tensors XYXY, in records XYWH
(``pycocotools.mask.toBbox`` of the RLE).
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, runtime_checkable

import numpy as np
import torch

from slip.errors import DeviceOutOfMemoryError
from slip.filters import apply_filters, parse_filters
from slip.request import ModelRef
from slip.timing import StageTimer
from slip.types import MaskSet, Proposals


@runtime_checkable
class MaskSource(Protocol):
    """Every segment a model finds in an image, before the annotation filters."""

    points_per_batch: int  # prompts per forward pass (speed and memory only)

    def generate_masks(self, image: np.ndarray, *, timings: Optional[dict[str, float]] = None) -> MaskSet:
        """``(H, W, 3) uint8`` RGB image -> its segments on the model's device; ``timings`` accumulates
        seconds per stage when given."""
        ...


class Proposer:
    """A mask source and a filter chain: :meth:`propose` is the prompt-independent half of a pipeline."""

    def __init__(self, source: MaskSource, filters: str, *, ref: ModelRef | None = None, device: Any = None) -> None:
        self.source = source
        self.filter_chain = filters  # a slip.filter_chain chain string ("none": no filter)
        self.filters = parse_filters(filters)
        self.ref = ref  # the model as results name it (None for a source built in memory)
        self.device = device  # where StageTimer waits for queued work (a torch.device), None: no sync

    def propose(self, image: np.ndarray, timer: StageTimer | None = None) -> Proposals:
        """Segments of an ``(H, W, 3) uint8`` image after the filters; stages ``sam`` and ``filters`` (plus the
        source's own: ``encode``, ``decode``, ``postprocess``) are added to ``timer``."""
        timer = timer or StageTimer()
        # 1. every segment the model finds (host memory running out is the same condition as device memory)
        with timer.stage("sam", self.device):
            try:
                masks = self.source.generate_masks(image, timings=timer.seconds)
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not out_of_memory(e):
                    raise
                raise DeviceOutOfMemoryError(
                    f"out of memory while generating masks for a {image.shape[1]}x{image.shape[0]} image with "
                    f"points_per_batch={getattr(self.source, 'points_per_batch', '?')}: retry with a smaller "
                    "points_per_batch"
                ) from e
        # 2. remove duplicates, background and contained segments
        with timer.stage("filters", self.device):
            kept, stats = apply_filters(masks, self.filters)
        return Proposals(segments=kept, filter_stats=stats, generated=len(masks))


def proposal_records(proposals: Proposals) -> list[dict]:
    """The stored form of proposals: one record per segment with ``segmentation`` (COCO RLE), ``bbox`` (XYWH),
    ``area``, ``predicted_iou``, ``stability_score``, ``point_coords``, ``crop_box``."""
    from slip.outputs import segment_records

    return segment_records(proposals.segments)


def out_of_memory(error: BaseException) -> bool:
    """Whether a torch error is an allocation that failed: on a GPU ``torch.OutOfMemoryError``; on the host a
    ``RuntimeError`` from the CPU allocator ("DefaultCPUAllocator: can't allocate memory")."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return "can't allocate memory" in text or "not enough memory" in text
