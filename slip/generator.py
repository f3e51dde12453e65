"""SAM's automatic mask generator, kept in tensors: the same masks as ``SamAutomaticMaskGenerator``, faster.

:class:`MaskGenerator` takes the keyword options of ``segment_anything.SamAutomaticMaskGenerator`` (plus
``dtype``) and, for the same model, image and options, returns the same masks, boxes and scores in the
same order — bit for bit in fp32 (``tests/slip/test_generator*.py``). What is done differently:

* encoder and decoder: :mod:`slip.sam_fast` (attention without the ``(N, N)`` fp32 matrix; the
  point-independent half of the decoder once per image, no per-point copy of the image embedding);
* the official generator upscales *every* candidate to full resolution (two bilinear passes) to filter
  it, RLE-encodes survivors and decodes them again. Here candidates are filtered by predicted IoU on
  the low-resolution logits; on CPU each remaining one is upscaled once, only inside the window where it
  can be positive (:class:`slip.sam_fast.WindowUpscaler`), which yields its box, stability score and
  mask; NMS survivors are pasted into ``(N, H, W)`` masks. On GPU survivors are upscaled again whole;
* nothing is RLE-encoded unless an ``*_rle`` output mode asks; small-region removal (OpenCV, as the
  official) runs on the final set only.

``dtype="bf16"`` (CPU, GPU) / ``"fp16"`` (GPU) autocasts over the fp32 weights: faster, close to the fp32
masks but not the same (``bench/segment.py --agreement`` measures how close). Point grids, crop boxes,
stability score, box extraction, the crop-edge test and small-region removal are the official
``segment_anything.utils.amg`` functions, so semantics match.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.amg import (
    batch_iterator,
    batched_mask_to_box,
    build_all_layer_point_grids,
    calculate_stability_score,
    generate_crop_boxes,
    is_box_near_crop_edge,
    remove_small_regions,
    uncrop_boxes_xyxy,
    uncrop_masks,
    uncrop_points,
)
from segment_anything.utils.transforms import ResizeLongestSide
from torchvision.ops.boxes import batched_nms, box_area

from slip.device import resolve_dtype
from slip.errors import ConfigError, DeviceOutOfMemoryError, ImageError
from slip.sam_fast import PointDecoder, WindowUpscaler, encode_image, in_threes, kernel_key
from slip.types import MaskSet

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
LARGE_WINDOW = 0.5  # a window over this fraction of the crop is upscaled by postprocess_masks whole
LARGE_GROUP = 24  # such masks upscaled per call (a multiple of 3; 24 x 1024 x 1024 float32 = 96 MiB at most)


@dataclass(frozen=True)
class _Candidates:
    """Masks of one crop that passed the score and crop-edge filters, before NMS (crop frame)."""

    iou: torch.Tensor  # (K,) float, predicted IoU
    stability: torch.Tensor  # (K,) float, stability score
    boxes: torch.Tensor  # (K, 4) int64, inclusive XYXY pixels in the crop
    points: torch.Tensor  # (K, 2) float64, XY pixels of the prompt point in the crop
    ref: torch.Tensor  # (K,) int64, index of the mask's piece in _Crop.pieces

    def select(self, index: torch.Tensor) -> "_Candidates":
        return _Candidates(*(getattr(self, f)[index] for f in self.__dataclass_fields__))

    @staticmethod
    def cat(parts: Sequence["_Candidates"]) -> "_Candidates":
        fields = _Candidates.__dataclass_fields__
        return _Candidates(*(torch.cat([getattr(p, f) for p in parts]) for f in fields))


@dataclass
class _Crop:
    """One crop's geometry and the mask pieces of its candidates."""

    box: list[int]  # XYXY pixels of the crop in the image
    input_size: tuple[int, int]  # (h, w) of the crop resized for the encoder, before padding
    orig_size: tuple[int, int]  # (H, W) of the whole image
    upscaler: Optional[WindowUpscaler]  # None: full upscaling (GPU, or a build it cannot reproduce)
    pieces: list  # per candidate: (h, w) bool mask inside its box (windows) or (h', w') logits (full)

    @property
    def size(self) -> tuple[int, int]:
        return self.box[3] - self.box[1], self.box[2] - self.box[0]


class MaskGenerator:
    """Every segment SAM finds in an image; see the module docstring.

    The options are those of ``SamAutomaticMaskGenerator``, with the same defaults and meanings;
    ``points_per_batch`` only trades speed for memory (a smaller value fixes an out-of-memory error).
    ``dtype``: compute precision, ``"fp32"`` (the official generator's masks), ``"bf16"`` (CPU, GPU) or
    ``"fp16"`` (GPU), by autocast over the model's fp32 weights.
    """

    def __init__(
        self,
        sam: Sam,
        *,
        points_per_side: Optional[int] = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: Optional[list[np.ndarray]] = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        dtype: str = "fp32",
    ) -> None:
        self._options = dict(
            points_per_side=points_per_side, points_per_batch=points_per_batch,
            pred_iou_thresh=pred_iou_thresh, stability_score_thresh=stability_score_thresh,
            stability_score_offset=stability_score_offset, box_nms_thresh=box_nms_thresh,
            crop_n_layers=crop_n_layers, crop_nms_thresh=crop_nms_thresh,
            crop_overlap_ratio=crop_overlap_ratio,
            crop_n_points_downscale_factor=crop_n_points_downscale_factor, point_grids=point_grids,
            min_mask_region_area=min_mask_region_area, output_mode=output_mode, dtype=dtype,
        )
        self.point_grids = _point_grids(self._options)  # per crop layer: (P, 2) XY in [0, 1]
        self.sam = sam
        self.compute_dtype = _compute_dtype(dtype, sam)
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = float(pred_iou_thresh)
        self.stability_score_thresh = float(stability_score_thresh)
        self.stability_score_offset = float(stability_score_offset)
        self.box_nms_thresh = float(box_nms_thresh)
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = float(crop_nms_thresh)
        self.crop_overlap_ratio = float(crop_overlap_ratio)
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode
        self._prepare_model(sam)
        self._threads = torch.get_num_threads()  # the caller's intra-op threads (set again by every call)
        self._upscalers: dict[tuple, Optional[WindowUpscaler]] = {}  # per (low-res, input, crop) geometry

    @property
    def device(self) -> torch.device:
        return self.sam.device

    def params(self) -> dict:
        """The options, JSON-serialisable (point grids as nested lists)."""
        grids = self._options["point_grids"]
        return self._options | {"point_grids": None if grids is None else [np.asarray(g).tolist() for g in grids]}

    def replace(self, **changes: Any) -> "MaskGenerator":
        """A generator on the same model with some options changed (e.g. a smaller ``points_per_batch``)."""
        return type(self)(self.sam, **(self._options | changes))

    def generate(self, image: np.ndarray, *, timings: Optional[dict[str, float]] = None) -> list[dict[str, Any]]:
        """The official generator's records for an ``(H, W, 3) uint8`` RGB image, in its order.

        Each record: ``segmentation`` (``(H, W) bool`` array, or an uncompressed / COCO RLE dict, per
        ``output_mode``), ``area`` (int pixels), ``bbox`` (XYWH ints), ``predicted_iou``,
        ``point_coords`` (``[[x, y]]`` pixels), ``stability_score``, ``crop_box`` (XYWH ints).
        ``timings``: as for :meth:`generate_masks`, plus ``records``.
        """
        found = self._run(image, timings)
        with _Clock(timings, self.device)("records"):
            return self._records(found)

    def generate_masks(self, image: np.ndarray, *, timings: Optional[dict[str, float]] = None) -> MaskSet:
        """The same segments as :meth:`generate`, in the same order, as tensors on the model's device.

        ``timings``, when given, accumulates seconds per stage: ``encode`` (image encoder), ``decode``
        (prompt encoder + mask decoder), ``postprocess`` (upscaling, filters, NMS), ``small_regions``.
        """
        found = self._run(image, timings)
        return replace(found, point_coords=found.point_coords.float())

    # --- stages ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def _run(self, image: np.ndarray, timings: Optional[dict[str, float]]) -> MaskSet:
        """Validated, OOM-classified generation; ``point_coords`` stay float64 for the records."""
        _check_image(image)
        self._threads = torch.get_num_threads()  # the caller's: the official kernels we reproduce depend on it
        try:
            return self._generate(image, _Clock(timings, self.device))
        except torch.cuda.OutOfMemoryError as e:
            raise DeviceOutOfMemoryError(
                f"out of GPU memory while generating masks for a {image.shape[1]}x{image.shape[0]} image "
                f"with points_per_batch={self.points_per_batch}: retry with a smaller points_per_batch"
            ) from e

    def _generate(self, image: np.ndarray, clock: "_Clock") -> MaskSet:
        orig_size = image.shape[:2]
        crop_boxes, layers = generate_crop_boxes(orig_size, self.crop_n_layers, self.crop_overlap_ratio)
        # 1. the masks of every crop, moved to the full-image frame
        parts = [self._process_crop(image, box, layer, clock) for box, layer in zip(crop_boxes, layers)]
        found = parts[0] if len(parts) == 1 else MaskSet(
            *(torch.cat([getattr(p, f) for p in parts]) for f in MaskSet.__dataclass_fields__)
        )
        # 2. duplicates between crops: the mask from the smaller crop wins
        if len(crop_boxes) > 1:
            with clock("postprocess"):
                found = found.select(self._crop_nms(found))
        # 3. fill small holes and drop small islands (OpenCV, CPU), then NMS again
        if self.min_mask_region_area > 0 and len(found) and self.removes_small_regions_last:
            with clock("small_regions"):
                found = self._remove_small_regions(found)
        return found

    def _process_crop(self, image: np.ndarray, crop_box: list[int], layer: int, clock: "_Clock") -> MaskSet:
        x0, y0, x1, y1 = crop_box
        crop_image = image[y0:y1, x0:x1, :]
        # 1. the crop's image embedding, and the decoder's per-image work
        with clock("encode"):
            features, input_size = self._encode(crop_image)
        with clock("decode"), self._autocast():
            decoder = self._decoder(features)
        crop = _Crop(crop_box, input_size, image.shape[:2], None, [])
        # 2. the crop's point grid, in batches; each batch keeps the candidates that pass the filters
        points = self.point_grids[layer] * np.array(crop.size)[None, ::-1]
        parts = [
            self._process_batch(batch, decoder, crop, clock)
            for (batch,) in batch_iterator(self.points_per_batch, points)
        ]
        with clock("postprocess"), self._post():
            cands = _Candidates.cat(parts)
            # 3. duplicates within the crop: the higher predicted IoU wins
            keep = batched_nms(cands.boxes.float(), cands.iou.float(), _zeros(cands.iou), self.box_nms_thresh)
            # 4. the survivors' full-image masks
            return self._materialise(cands.select(keep), crop)

    def _encode(self, crop: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """``(1, C, h, w)`` embedding of an ``(H, W, 3) uint8`` crop and its resized ``(H, W)``."""
        resized = torch.as_tensor(self._transform.apply_image(crop), device=self.device)
        resized = resized.permute(2, 0, 1).contiguous()[None]
        with self._autocast():
            features = encode_image(self.sam.image_encoder, self.sam.preprocess(resized))
        return features, tuple(resized.shape[-2:])

    def _process_batch(self, points: np.ndarray, decoder, crop: _Crop, clock: "_Clock") -> _Candidates:
        """Candidates from ``(B, 2)`` XY crop-pixel points: 3 masks per point, then the filters."""
        with clock("decode"):
            coords = self._model_coords(points, crop)
            with self._autocast():
                logits, iou = decoder(coords)
        with clock("postprocess"), self._post():
            logits, iou = self._low_res(logits.float()).flatten(0, 1), iou.flatten(0, 1).float()
            pts = self._record_points(points).repeat_interleave(3, dim=0)
            # 1. predicted IoU, on the low-resolution logits (before upscaling)
            if self.pred_iou_thresh > 0.0:
                logits, iou, pts = _take(iou > self.pred_iou_thresh, logits, iou, pts)
            # 2. boxes and stability scores of the upscaled masks; the masks are kept as pieces
            first = len(crop.pieces)
            boxes, stability = self._measure(logits, crop)
            ref = torch.arange(first, len(crop.pieces), device=self.device)
            if self.stability_score_thresh > 0.0:
                keep = stability >= self.stability_score_thresh
                iou, pts, stability, boxes, ref = _take(keep, iou, pts, stability, boxes, ref)
            # 3. drop masks that touch the crop's edge (but not the image's)
            near_edge = is_box_near_crop_edge(boxes, crop.box, [0, 0, crop.orig_size[1], crop.orig_size[0]])
            return _Candidates(iou, stability, boxes, pts, ref).select(~near_edge)

    def _measure(self, logits: torch.Tensor, crop: _Crop) -> tuple[torch.Tensor, torch.Tensor]:
        """``(K, 4)`` int64 boxes and ``(K,)`` stability scores of ``(K, h, w)`` logits upscaled to the crop;
        appends each mask to ``crop.pieces``."""
        if len(logits) == 0:
            return torch.zeros((0, 4), dtype=torch.long, device=self.device), logits.new_zeros(0)
        if crop.upscaler is None and self.device.type == "cpu":
            crop.upscaler = self._upscaler(tuple(logits.shape[-2:]), crop.input_size, crop.size)
        if crop.upscaler is None:  # full upscaling: keep the logits, upscale survivors again at the end
            masks = self._upscale(logits, crop)
            crop.pieces.extend(logits)
            stability = calculate_stability_score(masks, self.mask_threshold, self.stability_score_offset)
            return batched_mask_to_box(masks > self.mask_threshold).long(), stability
        windows = crop.upscaler.windows(logits, self.mask_threshold - self.stability_score_offset).tolist()
        measured = self._measure_large(logits, windows, crop)
        measured = [m or self._measure_one(mask, window, crop) for m, mask, window in zip(measured, logits, windows)]
        boxes = torch.tensor([m[0] for m in measured], dtype=torch.long).reshape(-1, 4)
        counts = torch.tensor([m[1:3] for m in measured], dtype=torch.int32).reshape(-1, 2)
        crop.pieces.extend(m[3] for m in measured)
        return boxes, counts[:, 0] / counts[:, 1]  # 0 / 0 = nan for an empty mask, as the official

    def _measure_large(self, logits: torch.Tensor, windows: list[list[int]], crop: _Crop) -> list[Optional[tuple]]:
        """The measures of the masks whose window covers over ``LARGE_WINDOW`` of the crop, None for the others:
        those are upscaled whole by SAM's own upscaling, ``LARGE_GROUP`` at a time (a small image makes most
        windows large: one call per group instead of one per mask; the values do not depend on the grouping)."""
        limit = LARGE_WINDOW * crop.size[0] * crop.size[1]
        large = [i for i, (r0, r1, c0, c1) in enumerate(windows) if r0 >= 0 and (r1 - r0 + 1) * (c1 - c0 + 1) > limit]
        measured: list[Optional[tuple]] = [None] * len(windows)
        for start in range(0, len(large), LARGE_GROUP):
            group = large[start : start + LARGE_GROUP]
            whole = self._upscale(logits[group], crop)
            for values, i in zip(whole, group):
                r0, r1, c0, c1 = windows[i]
                measured[i] = self._measure_values(values[r0 : r1 + 1, c0 : c1 + 1], windows[i])
        return measured

    def _measure_one(self, logits: torch.Tensor, window: list[int], crop: _Crop) -> tuple:
        """``(box XYXY, pixels above threshold + offset, above threshold - offset, bool piece or None)``
        of one ``(h, w)`` logit map upscaled to the crop, computed inside its ``[r0, r1, c0, c1]`` window."""
        r0, r1, c0, c1 = window
        if r0 < 0:
            return (0, 0, 0, 0), 0, 0, None
        return self._measure_values(crop.upscaler.values(logits, (r0, r1), (c0, c1)), window)

    def _measure_values(self, values: torch.Tensor, window: list[int]) -> tuple:
        """The measures of one mask's upscaled logits ``values`` inside its ``[r0, r1, c0, c1]`` window."""
        threshold, offset = self.mask_threshold, self.stability_score_offset
        r0, _, c0, _ = window
        high = int((values > threshold + offset).sum(dtype=torch.int32))
        low = int((values > threshold - offset).sum(dtype=torch.int32))
        # the tight box of values > threshold (row / column maxima: cheaper than any() on booleans)
        rows = (values.amax(1) > threshold).nonzero().flatten().tolist()
        if not rows:
            return (0, 0, 0, 0), high, low, None
        cols = (values.amax(0) > threshold).nonzero().flatten().tolist()
        piece = values[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] > threshold
        return (c0 + cols[0], r0 + rows[0], c0 + cols[-1], r0 + rows[-1]), high, low, piece

    def _upscaler(self, low_res: tuple[int, int], input_size: tuple[int, int], crop_size: tuple[int, int]
                  ) -> Optional[WindowUpscaler]:
        """The window upscaler of a geometry (cached), None when this build cannot reproduce the official."""
        with _intra_op(self._threads):  # built (and checked) under the caller's kernels
            key = (low_res, input_size, crop_size, kernel_key())
            if key not in self._upscalers:
                if len(self._upscalers) >= 64:
                    self._upscalers.clear()
                try:
                    self._upscalers[key] = self._new_upscaler(low_res, input_size, crop_size)
                except ValueError:
                    self._upscalers[key] = None
        return self._upscalers[key]

    def _materialise(self, cands: _Candidates, crop: _Crop) -> MaskSet:
        """Full-image ``MaskSet`` of the candidates that survived NMS."""
        x0, y0, x1, y1 = crop.box
        height, width = crop.orig_size
        if crop.upscaler is None:  # full upscaling, in chunks
            chunks = [torch.zeros((0, height, width), dtype=torch.bool, device=self.device)]
            pieces = [crop.pieces[i] for i in cands.ref.tolist()]
            for part in torch.stack(pieces).split(3 * self.points_per_batch) if pieces else ():
                binary = self._upscale(part, crop) > self.mask_threshold
                chunks.append(uncrop_masks(binary, crop.box, height, width))
            masks = torch.cat(chunks)
        else:  # paste each piece at its box
            masks = torch.zeros((len(cands.ref), height, width), dtype=torch.bool, device=self.device)
            for i, (ref, box) in enumerate(zip(cands.ref.tolist(), cands.boxes.tolist())):
                if crop.pieces[ref] is not None:
                    masks[i, y0 + box[1] : y0 + box[3] + 1, x0 + box[0] : x0 + box[2] + 1] = crop.pieces[ref]
        crop_xywh = torch.tensor([x0, y0, x1 - x0, y1 - y0], dtype=torch.float32, device=self.device)
        return MaskSet(
            masks=masks,
            boxes=uncrop_boxes_xyxy(cands.boxes, crop.box).float(),
            predicted_iou=cands.iou.float(),
            stability_score=cands.stability.float(),
            point_coords=uncrop_points(cands.points, crop.box),
            crop_boxes=crop_xywh.expand(len(masks), 4).clone(),
        )

    # --- what depends on the model family (SAM 1 here; slip.proposers.sam2_generator overrides them) --------

    removes_small_regions_last = True  # min_mask_region_area: OpenCV on the final masks (SAM 1's generator)
    integer_boxes = True  # records carry bbox / crop_box as ints (SAM 1's generator; SAM 2's has floats)

    def _prepare_model(self, sam: Sam) -> None:
        """The model's mask threshold and input transform."""
        self.mask_threshold = float(sam.mask_threshold)  # logits above it are inside the mask
        self._transform = ResizeLongestSide(sam.image_encoder.img_size)

    def _decoder(self, features: torch.Tensor) -> PointDecoder:
        """The point decoder over one crop's image embedding."""
        return PointDecoder(self.sam, features)

    def _model_coords(self, points: np.ndarray, crop: _Crop) -> torch.Tensor:
        """``(B, 2)`` XY crop pixels -> the decoder's input frame (float64, as the official generator)."""
        return torch.as_tensor(self._transform.apply_coords(points, crop.size), device=self.device)

    def _record_points(self, points: np.ndarray) -> torch.Tensor:
        """``(B, 2)`` XY crop pixels as the records carry them (float64)."""
        return torch.as_tensor(points, device=self.device)

    def _low_res(self, logits: torch.Tensor) -> torch.Tensor:
        """``(B, 3, h, w)`` low-resolution logits before any measurement (unchanged for SAM 1)."""
        return logits

    def _new_upscaler(self, low_res: tuple[int, int], input_size: tuple[int, int], crop_size: tuple[int, int]
                      ) -> WindowUpscaler:
        return WindowUpscaler(self.sam, low_res, input_size, crop_size)

    def _upscale(self, logits: torch.Tensor, crop: _Crop) -> torch.Tensor:
        """``(K, h, w)`` low-resolution logits -> ``(K, H, W)`` logits at crop resolution, under the caller's
        thread count (PyTorch's bilinear kernel depends on it, as the official generator's does)."""
        with _intra_op(self._threads):
            return self._resize(logits, crop)

    def _resize(self, logits: torch.Tensor, crop: _Crop) -> torch.Tensor:
        """SAM's own upscaling (``postprocess_masks``), three masks to an image as the official passes them."""
        return in_threes(lambda x: self.sam.postprocess_masks(x, crop.input_size, crop.size), logits)

    def _crop_nms(self, found: MaskSet) -> torch.Tensor:
        """Indices kept by NMS across crops, best first; the score is ``1 / crop area``."""
        x, y, w, h = found.crop_boxes.long().unbind(1)
        scores = 1 / box_area(torch.stack([x, y, x + w, y + h], 1))
        return batched_nms(found.boxes, scores, _zeros(scores), iou_threshold=self.crop_nms_thresh)

    def _remove_small_regions(self, found: MaskSet) -> MaskSet:
        """Holes and islands under ``min_mask_region_area`` pixels removed; masks that changed lose
        ties in a final NMS at ``max(box_nms_thresh, crop_nms_thresh)``."""
        fixed, unchanged = [], []
        for mask in found.masks.cpu().numpy():
            mask, holes = remove_small_regions(mask, self.min_mask_region_area, mode="holes")
            mask, islands = remove_small_regions(mask, self.min_mask_region_area, mode="islands")
            fixed.append(mask)
            unchanged.append(not (holes or islands))
        masks = torch.as_tensor(np.stack(fixed))
        new_boxes = batched_mask_to_box(masks)
        scores = torch.as_tensor(unchanged, dtype=torch.float32)
        nms_thresh = max(self.box_nms_thresh, self.crop_nms_thresh)
        keep = batched_nms(new_boxes.float(), scores, torch.zeros(len(scores)), iou_threshold=nms_thresh)
        boxes = torch.where(scores[:, None] > 0, found.boxes.cpu(), new_boxes.float())
        fixed_set = replace(found, masks=masks.to(self.device), boxes=boxes.to(self.device))
        return fixed_set.select(keep.to(self.device))

    def _records(self, found: MaskSet) -> list[dict[str, Any]]:
        """The official record dicts (see :meth:`generate`)."""
        masks = found.masks.cpu().numpy()
        segmentations: Sequence[Any] = list(masks)
        if self.output_mode != "binary_mask":
            encode = _rle_encode if self.output_mode == "uncompressed_rle" else _coco_encode
            segmentations = encode(masks)
        number = torch.long if self.integer_boxes else torch.float32
        xyxy = found.boxes.cpu().long()
        bbox = torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], 1).to(number).tolist()
        fields = zip(
            segmentations, masks.sum((1, 2)).tolist(), bbox,
            found.predicted_iou.tolist(), found.point_coords.tolist(), found.stability_score.tolist(),
            found.crop_boxes.cpu().long().to(number).tolist(),
        )
        return [
            {"segmentation": seg, "area": area, "bbox": box, "predicted_iou": iou, "point_coords": [point],
             "stability_score": stability, "crop_box": crop}
            for seg, area, box, iou, point, stability, crop in fields
        ]

    def _post(self):
        """Post-processing on CPU runs on one intra-op thread: it is thousands of small operations, and with
        several threads each one waits at a barrier for all of them — on a busy machine (a thread descheduled)
        that costs a time slice per operation. Values do not change: the window arithmetic is elementwise, and
        upscalers are built, and SAM's own upscaling runs, under the caller's thread count."""
        return _intra_op(1 if self.device.type == "cpu" else self._threads)

    def _autocast(self):
        """Autocast to the compute dtype unless it is fp32."""
        enabled = self.compute_dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=enabled)


# --- helpers -------------------------------------------------------------------------------------------------


class _Clock:
    """Adds wall-clock seconds per stage into ``timings``; a no-op (no device syncs) when it is None."""

    def __init__(self, timings: Optional[dict[str, float]], device: torch.device) -> None:
        self.timings, self.device = timings, device

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if self.timings is None:
            yield
            return
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start


@contextmanager
def _intra_op(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` for the block (restored after)."""
    before = torch.get_num_threads()
    if threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _take(keep: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The rows ``keep`` (a bool or index tensor) of each tensor."""
    return tuple(t[keep] for t in tensors)


def _zeros(like: torch.Tensor) -> torch.Tensor:
    """NMS categories: one class for every box."""
    return torch.zeros(len(like), device=like.device)


def _compute_dtype(name: Any, sam: Sam) -> torch.dtype:
    """The autocast dtype for the ``dtype`` option; fp32 on half-precision weights computes in theirs (the
    official generator cannot run those: its point encoding is float32)."""
    if not isinstance(name, str):
        raise ConfigError(f"dtype must be one of fp32, bf16, fp16, got {name!r}")
    dtype = resolve_dtype(name, sam.device)
    weights = next(sam.parameters()).dtype
    return weights if dtype == torch.float32 and weights != torch.float32 else dtype


def _check_image(image: Any) -> None:
    """ImageError unless ``image`` is a non-empty ``(H, W, 3) uint8`` numpy array."""
    if not isinstance(image, np.ndarray):
        raise ImageError(f"expected an (H, W, 3) uint8 RGB numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ImageError(
            f"expected an (H, W, 3) RGB image, got shape {tuple(image.shape)}: convert grayscale or RGBA "
            "images to RGB first (slip.load_image does)"
        )
    if image.dtype != np.uint8:
        raise ImageError(f"expected uint8 pixels in [0, 255], got dtype {image.dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageError(f"the image is empty: shape {tuple(image.shape)}")


def _point_grids(options: dict) -> list[np.ndarray]:
    """Validated options -> one ``(P, 2)`` grid of XY points in ``[0, 1]`` per crop layer."""
    o = options
    for name in ("points_per_batch", "crop_n_points_downscale_factor"):
        _check_int(name, o[name], minimum=1)
    for name in ("crop_n_layers", "min_mask_region_area"):
        _check_int(name, o[name], minimum=0)
    for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh", "crop_nms_thresh"):
        _check_float(name, o[name], 0.0, 1.0)
    _check_float("crop_overlap_ratio", o["crop_overlap_ratio"], 0.0, 1.0)
    _check_float("stability_score_offset", o["stability_score_offset"], 0.0, math.inf)
    if o["output_mode"] not in OUTPUT_MODES:
        raise ConfigError(f"unknown output_mode {o['output_mode']!r}: use one of {', '.join(OUTPUT_MODES)}")
    if (o["points_per_side"] is None) == (o["point_grids"] is None):
        raise ConfigError("give exactly one of points_per_side and point_grids (set the other to None)")
    if o["points_per_side"] is not None:
        _check_int("points_per_side", o["points_per_side"], minimum=1)
        if int(o["points_per_side"] / o["crop_n_points_downscale_factor"] ** o["crop_n_layers"]) < 1:
            raise ConfigError("points_per_side / crop_n_points_downscale_factor**crop_n_layers must be >= 1")
        return build_all_layer_point_grids(
            o["points_per_side"], o["crop_n_layers"], o["crop_n_points_downscale_factor"]
        )
    grids = [np.asarray(g, dtype=np.float64) for g in o["point_grids"]]
    if len(grids) < o["crop_n_layers"] + 1:
        raise ConfigError(
            f"point_grids has {len(grids)} grid(s); crop_n_layers={o['crop_n_layers']} "
            f"needs {o['crop_n_layers'] + 1}, one per crop layer"
        )
    for g in grids:
        if g.ndim != 2 or g.shape[1] != 2 or len(g) == 0 or not ((g >= 0) & (g <= 1)).all():
            raise ConfigError(f"each point grid must be a non-empty (P, 2) array of XY in [0, 1]; got {g.shape}")
    return grids


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_float(name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not low <= value <= high:
        raise ConfigError(f"{name} must be a number in [{low}, {high}], got {value!r}")


def _rle_encode(masks: np.ndarray) -> list[dict[str, Any]]:
    """``(N, H, W) bool`` -> uncompressed COCO RLEs (column-major runs, first run of zeros)."""
    n, h, w = masks.shape
    flat = masks.transpose(0, 2, 1).reshape(n, -1)
    rows, cols = np.nonzero(flat[:, 1:] != flat[:, :-1])
    starts = np.searchsorted(rows, np.arange(n + 1))
    out = []
    for i in range(n):
        bounds = np.concatenate([[0], cols[starts[i] : starts[i + 1]] + 1, [h * w]])
        counts = np.diff(bounds).tolist()
        out.append({"size": [h, w], "counts": [0] + counts if flat[i, 0] else counts})
    return out


def _coco_encode(masks: np.ndarray) -> list[dict[str, Any]]:
    """``(N, H, W) bool`` -> compressed COCO RLEs with ``counts`` as a UTF-8 string."""
    from pycocotools import mask as mask_utils

    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("utf-8")} for r in rles]
