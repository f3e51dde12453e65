"""The automatic mask generator for Hugging Face promptable-mask models with SAM 2's prompt interface: EdgeTAM
(``transformers.EdgeTamModel``) and the SAM 3 tracker (``transformers.Sam3TrackerModel``).

:class:`HfTrackerMaskGenerator` is :class:`slip.proposers.sam2_generator.Sam2MaskGenerator` (the options of
:class:`slip.generator.MaskGenerator`, the same fast path: candidates filtered on the low-resolution logits,
each upscaled only inside its window, nothing RLE-encoded unless asked, SAM 2's small-region filling) over the
transformers model, with what these models do differently:

* image: the model's own image processor (``Sam2ImageProcessor`` for EdgeTAM, ``Sam3ImageProcessor`` for the
  SAM 3 tracker: a square resize to ``S`` = 1024 / 1008, mean/std), then ``model.get_image_embeddings`` once per
  crop: ``[(1, C/8, S/4, S/4), (1, C/4, S/8, S/8), (1, C, S/16, S/16)]`` (EdgeTAM) or the same at ``S/14``
  strides times 4, 2, 1 (SAM 3 tracker), "no memory" embedding added;
* points: the grid of transformers' ``mask-generation`` pipeline (``torch.linspace`` in float32, scaled by the
  crop's width and height), mapped to the model's input frame as ``Sam2Processor`` maps user points
  (``x * S / w``, ``y * S / h``, float32); records carry them as float32;
* decoder: :class:`slip.proposers.hf_tracker_fast.HfFastPointDecoder`, the model's prompt encoder + mask decoder
  for one positive point per prompt with ``multimask_output=True``, the point-independent work once per image:
  ``(B, 3, S/4, S/4)`` logits (EdgeTAM; ``4 S / 14`` for the SAM 3 tracker) and ``(B, 3)`` predicted IoU, bit for
  bit what ``model.forward`` (:class:`HfPointDecoder`, the pipeline's call) returns for the batch;
* upscaling: one bilinear resize of the low-resolution logits straight to the crop
  (:meth:`slip.sam_fast.WindowUpscaler.direct`), as the pipeline's ``post_process_masks``;
* defaults: SAM 2's (``pred_iou_thresh=0.8``), mask threshold 0.

Against ``pipeline("mask-generation")`` on the same weights (``tests/engines/test_hf_trackers.py``): with
thresholds 0, one crop and ``box_nms_thresh`` equal to the pipeline's ``crops_nms_thresh``, the masks, boxes and
scores are identical on square images, in the same order. What differs, by design:

* non-square images: the pipeline maps grid points with SAM 1's longest-side rule (``_normalize_coordinates``
  of the image processor) onto an input that ``Sam2ImageProcessor`` resized to a square, so its points sit
  at ``y * S / max(h, w)`` instead of ``y * S / h`` (or the same for x): they miss the pixels they name. Here
  points land where the grid puts them (``Sam2Processor``'s mapping of user points);
* stability: the pipeline keeps ``stability > thresh``, SAM's generators (and this one) ``>= thresh``;
* NMS: the pipeline runs one NMS over all crops at ``crops_nms_thresh`` with the predicted IoU as score; here,
  as in SAM's generators, NMS within each crop at ``box_nms_thresh``, then across crops preferring the
  smaller crop at ``crop_nms_thresh``;
* ``min_mask_region_area``: the pipeline's hole / sprinkle options do nothing (transformers has no
  connected-components kernel); here holes and sprinkles are filled on the low-resolution logits as SAM 2 does.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from slip.proposers.hf_tracker_fast import HfFastPointDecoder
from slip.proposers.hf_trackers import image_processor_of, input_size
from slip.proposers.sam2_generator import MASK_THRESHOLD, SAM2_DEFAULTS, Sam2MaskGenerator
from slip.sam_fast import chunk_sizes


class HfTrackerMaskGenerator(Sam2MaskGenerator):
    """Every segment an EdgeTAM or SAM 3 tracker finds in an image; the options of
    :class:`slip.generator.MaskGenerator` (``pred_iou_thresh`` defaults to SAM 2's 0.8)."""

    def __init__(self, model, *, pred_iou_thresh: float = SAM2_DEFAULTS["pred_iou_thresh"], **options: Any) -> None:
        super().__init__(model, pred_iou_thresh=pred_iou_thresh, **options)
        if self._options["point_grids"] is None:  # the pipeline's grids (the checked options are the same)
            side, factor = self._options["points_per_side"], self._options["crop_n_points_downscale_factor"]
            self.point_grids = [point_grid(int(side / factor**layer)) for layer in range(self.crop_n_layers + 1)]

    def _prepare_model(self, model) -> None:
        self.mask_threshold = MASK_THRESHOLD
        self.image_size = input_size(model)
        self.processor = image_processor_of(model)

    def _encode(self, crop: np.ndarray) -> tuple[list[torch.Tensor], tuple[int, int]]:
        """``model.get_image_embeddings`` of an ``(H, W, 3) uint8`` crop after the model's image processor: the
        feature maps, finest first, the last one the image embedding; and the input size ``(S, S)``."""
        pixels = self.processor(images=crop, return_tensors="pt")["pixel_values"]
        pixels = pixels.to(device=self.device, dtype=next(self.sam.parameters()).dtype)
        with self._autocast():
            features = self.sam.get_image_embeddings(pixels)
        return list(features), (self.image_size, self.image_size)

    def _decoder(self, features: list[torch.Tensor]) -> HfFastPointDecoder:
        return HfFastPointDecoder(self.sam, features)

    def _model_coords(self, points: np.ndarray, crop) -> torch.Tensor:
        """``(B, 2)`` XY crop pixels -> the model's ``(S, S)`` input frame, float32, as ``Sam2Processor`` maps
        points (``x * S / w``, ``y * S / h``)."""
        height, width = crop.size
        coords = torch.as_tensor(points, dtype=torch.float32, device=self.device).clone()
        coords[:, 0] = coords[:, 0] * (self.image_size / width)
        coords[:, 1] = coords[:, 1] * (self.image_size / height)
        return coords


class HfPointDecoder:
    """``HfPointDecoder(model, features)(coords)``: the transformers model's prompt encoder + mask decoder for one
    positive point per prompt, ``multimask_output=True``, on one image's ``features`` (``get_image_embeddings``),
    called as the mask-generation pipeline calls it (the reference of :class:`HfFastPointDecoder`).

    ``coords`` ``(B, 2)`` float32 XY in the ``(S, S)`` input frame -> logits ``(B, 3, h, w)`` (``h = w = S / 4``
    for EdgeTAM, ``4 S / 14`` for the SAM 3 tracker) and predicted IoU ``(B, 3)``. The points go through
    ``model.forward(image_embeddings=...)`` in parts of at most ``chunk`` (default: all ``B`` at once, the batch
    the caller chose, as the pipeline's ``points_per_batch``; the decoder's matrix products see the same shapes,
    so the values are the pipeline's)."""

    def __init__(self, model, features: list[torch.Tensor], *, chunk: Optional[int] = None) -> None:
        self.model, self.features, self.chunk = model, features, chunk

    def __call__(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sizes = chunk_sizes(len(coords), self.chunk) if self.chunk else [len(coords)]
        parts = [self._decode(part) for part in coords.split(sizes)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _decode(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        points = coords[None, :, None, :]  # (1 image, B prompts, 1 point, XY)
        labels = torch.ones(points.shape[:3], dtype=torch.long, device=coords.device)
        out = self.model(image_embeddings=self.features, input_points=points, input_labels=labels,
                         multimask_output=True)
        return out.pred_masks[0], out.iou_scores[0]


def point_grid(n_per_side: int) -> np.ndarray:
    """``(n * n, 2)`` XY points in ``[0, 1]``, the cell centres of an ``n x n`` grid, row by row: the values of
    transformers' mask-generation grid (``torch.linspace`` in float32), as float64 (exactly)."""
    offset = 1 / (2 * n_per_side)
    side = torch.linspace(offset, 1 - offset, n_per_side)
    xs, ys = side[None, :].expand(n_per_side, -1), side[:, None].expand(-1, n_per_side)
    return torch.stack([xs, ys], dim=-1).reshape(-1, 2).double().numpy()
