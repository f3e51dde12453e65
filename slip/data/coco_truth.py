"""Rules for reading a user's COCO instances file as ground truth (``slip compare``, the gallery's hit / miss):
which categories are prompts, whether the objects are outlined by masks or by boxes only, and a box as pixels.
Plain dicts in, no pycocotools or torch."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from slip.errors import DatasetError


def group_categories(data: dict) -> tuple[str, ...]:
    """Categories of a COCO file that name a group of the others rather than an object: no annotation has one,
    and it is the ``supercategory`` of another category. Roboflow's exports carry one (id 0, the dataset's name,
    the supercategory of every class); queried as a prompt on every image it would only add false positives."""
    used = {a.get("category_id") for a in data["annotations"]}
    parents = {c.get("supercategory") for c in data["categories"] if c.get("supercategory") != c["name"]}
    return tuple(c["name"] for c in data["categories"] if c["id"] not in used and c["name"] in parents)


def truth_shape(path: Path, annotations: Sequence[dict]) -> tuple[str, int]:
    """``("mask", 0)`` when every annotation has a segmentation; ``("box", n)`` when ``n`` of them have a box
    and no segmentation (a detection dataset: everything is then scored on boxes); DatasetError naming the
    first annotation with neither."""
    boxed = [a for a in annotations if not _has_mask(a)]
    bare = next((a for a in boxed if not _has_box(a)), None)
    if bare is not None:
        raise DatasetError(f"{path}: annotation {bare.get('id')!r} (image {bare.get('image_id')!r}) has neither a "
                           "segmentation nor a bbox [x, y, width, height]")
    return ("box", len(boxed)) if boxed else ("mask", 0)


def _has_mask(ann: dict) -> bool:
    segmentation = ann.get("segmentation")
    if isinstance(segmentation, dict):
        return "counts" in segmentation and "size" in segmentation
    return isinstance(segmentation, list) and any(isinstance(p, list) and len(p) >= 6 for p in segmentation)


def _has_box(ann: dict) -> bool:
    box = ann.get("bbox")
    return isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)



def box_mask(box: Sequence[float], height: int, width: int) -> np.ndarray:
    """A COCO box ``[x, y, w, h]`` (pixels) as an ``(height, width) bool`` mask: every pixel it touches."""
    x, y, w, h = box
    mask = np.zeros((int(height), int(width)), bool)
    mask[max(0, int(y)):int(np.ceil(y + h)), max(0, int(x)):int(np.ceil(x + w))] = True
    return mask
