"""Builders of segments.json v2 documents and ExportItems from masks (shared by the exports tests)."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from producer.exports import ExportItem
from slip.outputs import encode_rle


def v2_doc(masks: np.ndarray, prompts: Sequence[str], chosen: Mapping[str, Sequence[tuple[int, float]]],
           *, threshold: float | None = None) -> dict:
    """A segments.json v2 document: ``masks`` (N, H, W) bool are the segments; ``chosen[prompt]`` its
    instances as (segment, score), best first (``[]`` = not found, absent = not answered)."""
    n, h, w = masks.shape
    rles = encode_rle(masks)
    segments = [{"id": i, "segmentation": r, "bbox": [float(v) for v in mask_utils.toBbox(r)],
                 "area": int(mask_utils.area(r)), "predicted_iou": 0.9, "stability_score": 0.95,
                 "point_coords": [0.0, 0.0], "crop_box": [0, 0, w, h], "similarity": {}}
                for i, r in enumerate(rles)]
    matches = []
    for prompt in prompts:
        if prompt not in chosen:
            continue
        inst = [{"segment": s, "score": sc} for s, sc in chosen[prompt]]
        best = inst[0] if inst else ({"segment": 0, "score": 0.01} if n else None)
        matches.append({"prompt": prompt, "threshold": threshold, "instances": inst, "best": best, "top_k": inst})
    return {"format_version": 2, "image_size": {"height": h, "width": w}, "prompts": list(prompts),
            "request": {}, "request_digest": "0" * 64, "generated": n, "filters": [], "segments": segments,
            "matches": matches, "timings_s": {}}


def done_item(index: int, name: str, doc: dict, image: bytes | None = None) -> ExportItem:
    return ExportItem(index=index, name=name, state="done", doc=doc, reason=None,
                      image=None if image is None else (lambda: image))


def failed_item(index: int, name: str, reason: str) -> ExportItem:
    return ExportItem(index=index, name=name, state="failed", doc=None, reason=reason, image=None)


def disc(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def ring_mask(h: int, w: int, cy: float, cx: float, r_out: float, r_in: float) -> np.ndarray:
    """A disc with a round hole."""
    return disc(h, w, cy, cx, r_out) & ~disc(h, w, cy, cx, r_in)


def sample_masks(h: int, w: int) -> np.ndarray:
    """(4, h, w) bool: a disc, a disc with a hole, two separate discs (one instance in two parts), a 1-pixel
    speck (laid out for h, w = 60, 80)."""
    speck = np.zeros((h, w), bool)
    speck[3, 77] = True
    return np.stack([disc(h, w, 20, 20, 10), ring_mask(h, w, 35, 50, 15, 6),
                     disc(h, w, 50, 10, 5) | disc(h, w, 8, 70, 4), speck])
