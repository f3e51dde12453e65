"""SAM 2's automatic mask generator, kept in tensors: the masks of ``SAM2AutomaticMaskGenerator``, faster.

:class:`Sam2MaskGenerator` is :class:`slip.generator.MaskGenerator` (same options, same fast path: filters on
the low-resolution logits, each candidate upscaled only inside its window, nothing RLE-encoded unless asked)
over the official ``sam2`` model, with what SAM 2 does differently:

* image: ``SAM2Transforms`` (a square resize to ``image_size``, ImageNet mean/std), the Hiera encoder + FPN
  neck, the "no memory" embedding added, exactly as ``SAM2ImagePredictor.set_image``;
* points: float32, normalised by the crop size and scaled to ``image_size`` (``transform_coords``); the
  records carry them as float32, as the official generator does;
* decoder: :class:`slip.proposers.sam2_fast.Sam2PointDecoder` (high-resolution features, object-score token),
  bit-identical to the predictor's;
* upscaling: one bilinear resize of the ``(4h, 4w)`` logits straight to the crop
  (:meth:`slip.sam_fast.WindowUpscaler.direct`);
* ``min_mask_region_area``: holes and sprinkles up to that area are filled / removed on the low-resolution
  logits before upscaling (8-connected components, OpenCV), as ``SAM2Transforms.postprocess_masks`` does
  with the sam2 CUDA extension (without it, the official generator skips this step with a warning);
* defaults: ``pred_iou_thresh=0.8`` (SAM 2's), mask threshold 0.

In fp32 the records equal the official generator's, bit for bit (``tests/engines/test_sam2_generator.py``).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from slip.generator import MaskGenerator
from slip.proposers.sam2_fast import Sam2PointDecoder
from slip.sam_fast import WindowUpscaler, in_threes

SAM2_DEFAULTS = {"pred_iou_thresh": 0.8}  # where SAM2AutomaticMaskGenerator's defaults differ from SAM's
MASK_THRESHOLD = 0.0  # SAM2AutomaticMaskGenerator's mask_threshold
FILL = 10.0  # holes become threshold + FILL, sprinkles threshold - FILL (SAM2Transforms)


class Sam2MaskGenerator(MaskGenerator):
    """Every segment a SAM 2 model finds in an image; the options of :class:`slip.generator.MaskGenerator`
    (``pred_iou_thresh`` defaults to SAM 2's 0.8)."""

    removes_small_regions_last = False  # SAM 2 fills holes on the low-resolution logits instead
    integer_boxes = False  # the official records carry float32 boxes

    def __init__(self, model, *, pred_iou_thresh: float = SAM2_DEFAULTS["pred_iou_thresh"], **options: Any) -> None:
        super().__init__(model, pred_iou_thresh=pred_iou_thresh, **options)

    def _prepare_model(self, model) -> None:
        from sam2.utils.transforms import SAM2Transforms

        self.mask_threshold = MASK_THRESHOLD
        self.image_size = int(model.image_size)
        self._transforms = SAM2Transforms(resolution=self.image_size, mask_threshold=MASK_THRESHOLD)

    def _encode(self, crop: np.ndarray) -> tuple[dict, tuple[int, int]]:
        """``SAM2ImagePredictor.set_image`` of an ``(H, W, 3) uint8`` crop: ``{"image_embed": (1, C, S/16, S/16),
        "high_res_feats": [(1, C/8, S/4, S/4), (1, C/4, S/8, S/8)]}`` and the input size ``(S, S)``."""
        model, size = self.sam, self.image_size
        pixels = self._transforms(crop)[None].to(self.device)
        with self._autocast():  # the levels SAM2Base._prepare_backbone_features keeps, as maps, fine to coarse
            maps = model.forward_image(pixels)["backbone_fpn"][-model.num_feature_levels:]
            if model.directly_add_no_mem_embed:  # (1, 1, C) added to every (token, C) row: the same sums
                maps[-1] = maps[-1] + model.no_mem_embed.view(1, -1, 1, 1)
        return {"image_embed": maps[-1], "high_res_feats": maps[:-1]}, (size, size)

    def _decoder(self, features: dict) -> Sam2PointDecoder:
        return Sam2PointDecoder(self.sam, features)

    def _model_coords(self, points: np.ndarray, crop) -> torch.Tensor:
        pts = torch.as_tensor(points, dtype=torch.float32, device=self.device)
        return self._transforms.transform_coords(pts, normalize=True, orig_hw=crop.size)

    def _record_points(self, points: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(points, dtype=torch.float32, device=self.device)

    def _low_res(self, logits: torch.Tensor) -> torch.Tensor:
        if self.min_mask_region_area <= 0:
            return logits
        return fill_small_regions(logits, self.min_mask_region_area, self.mask_threshold)

    def _new_upscaler(self, low_res, input_size, crop_size) -> WindowUpscaler:
        return WindowUpscaler.direct(low_res, crop_size)

    def _resize(self, logits: torch.Tensor, crop) -> torch.Tensor:
        return in_threes(lambda x: F.interpolate(x, crop.size, mode="bilinear", align_corners=False), logits)


def fill_small_regions(logits: torch.Tensor, max_area: int, threshold: float, *,
                       connectivity: int = 8) -> torch.Tensor:
    """``(B, M, h, w)`` logits with background components of at most ``max_area`` pixels set to ``threshold +
    FILL`` (holes) and foreground components of at most ``max_area`` set to ``threshold - FILL`` (sprinkles),
    both found on the input (``SAM2Transforms.postprocess_masks``)."""
    import cv2

    out = logits.clone()
    flat, source = out.view(-1, *logits.shape[-2:]), logits.reshape(-1, *logits.shape[-2:]).cpu().numpy()
    for i, plane in enumerate(source):
        for region, value in ((plane <= threshold, threshold + FILL), (plane > threshold, threshold - FILL)):
            small = _small_components(region, max_area, connectivity, cv2)
            if small is not None:
                flat[i][torch.from_numpy(small).to(out.device)] = value
    return out


def _small_components(region: np.ndarray, max_area: int, connectivity: int, cv2) -> Optional[np.ndarray]:
    """``(h, w) bool``: the pixels of ``region``'s connected components of at most ``max_area`` pixels."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(region.astype(np.uint8), connectivity=connectivity)
    small = [k for k in range(1, count) if stats[k, cv2.CC_STAT_AREA] <= max_area]
    return np.isin(labels, small) if small else None
