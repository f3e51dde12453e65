"""Rules for reading a user's COCO instances file as ground truth (``slip compare``, the gallery's hit / miss):
which categories are prompts, and whether the objects are outlined by masks or by boxes only. Plain dicts in,
no pycocotools or torch."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

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


def match_files(file_names: Sequence[str], paths: Sequence[str]) -> dict[int, int]:
    """Which of ``paths`` each truth ``file_name`` names: ``{file_name index: path index}``.

    Tools write ``file_name`` their own way: relative to the image folder (``circle/00000.png``), with the
    export's folder in front (Label Studio: ``images/<hash>-photo.jpg``), as the server's path
    (``/data/upload/1/<hash>-photo.jpg``), with backslashes. A name matches the one path that ends with its last
    ``k`` parts, trying its whole length first and then shorter tails; a tail that two names or two paths share
    matches nothing at that length, and a path matched once is not matched again."""
    names = [_parts(n) for n in file_names]
    files = [_parts(p) for p in paths]
    matched: dict[int, int] = {}
    claimed: set[int] = set()
    for k in range(max(map(len, names), default=0), 0, -1):
        tails: dict[tuple[str, ...], list[int]] = {}
        for j, parts in enumerate(files):
            if j not in claimed and len(parts) >= k:
                tails.setdefault(parts[-k:], []).append(j)
        wanted: dict[tuple[str, ...], list[int]] = {}
        for i, parts in enumerate(names):
            if i not in matched and len(parts) >= k:
                wanted.setdefault(parts[-k:], []).append(i)
        for tail, (i, *others) in wanted.items():
            if not others and len(tails.get(tail, ())) == 1:
                matched[i] = tails[tail][0]
                claimed.add(tails[tail][0])
    return matched


def _parts(name: str) -> tuple[str, ...]:
    return tuple(p for p in str(name).replace("\\", "/").split("/") if p not in ("", "."))
