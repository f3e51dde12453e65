"""COCO exports: an instances dataset file (``coco``) and the list ``COCO.loadRes`` takes (``coco-results``).

``coco`` (a dataset file, loads with ``pycocotools.coco.COCO(path)``)::

    {"info": {"description", "job_id", "prompts", "date_created"}, "licenses": [],
     "categories": [{"id": prompt index + 1, "name": prompt, "supercategory": "prompt"}],
     "images": [{"id": item index + 1, "file_name": item name (relative, "/"), "width", "height"}],
     "annotations": [{"id", "image_id", "category_id", "segmentation": RLE {"size", "counts"},
                      "bbox": toBbox(RLE), "area": area(RLE), "iscrowd": 0, "score", "slip_segment"}]}

Every instance of every prompt is an annotation; only images that are done appear.

``coco-results`` (``COCO(gt).loadRes(path)``; ``COCOeval(gt, dt, "segm")``)::

    [{"image_id", "category_id", "segmentation": RLE, "bbox": toBbox(RLE), "score"}, ...]

Ids are the ground truth's when given (:func:`read_coco_ids`: images by ``file_name``, which the caller keys by
the item names with :func:`slip.inputs.keyed_by_names`; categories by ``name`` = prompt), else as in ``coco``.
Both files are written as the items come: the annotations of ``coco`` go to a spool file and are appended after
the images array.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from producer.exports_items import DONE, ExportItem, Tally, answers, atomic_file, image_size, item_doc
from slip.errors import ConfigError, DatasetError


@dataclass(frozen=True)
class CocoIds:
    """Ids of a COCO ground-truth file, for ``coco-results``."""

    image_ids: dict[str, int]  # file_name -> image id
    category_ids: dict[str, int]  # category name -> category id


def read_coco_ids(path: Path) -> CocoIds:
    """The image and category ids of a COCO annotation file; :class:`DatasetError` if it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise DatasetError(f"cannot read the ground truth {path}: {e.strerror or e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"the ground truth {path} is not JSON: {e}") from e
    try:
        images = {str(i["file_name"]): int(i["id"]) for i in data["images"]}
        categories = [(str(c["name"]), int(c["id"])) for c in data["categories"]]
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetError(f"{path} is not a COCO annotation file (needs images with file_name and id, "
                           f"categories with name and id): {type(e).__name__}: {e}") from e
    names = [n for n, _ in categories]
    if len(set(names)) != len(names):
        raise DatasetError(f"{path} has several categories of the same name; prompts match categories by name")
    return CocoIds(images, dict(categories))


def write_coco(items: Iterable[ExportItem], *, out: Path, prompts: Sequence[str], job_id: str, tally: Tally) -> None:
    """The ``coco`` dataset file (module docstring), streamed."""
    head = {
        "info": {"description": "SLIP queue results", "job_id": job_id, "prompts": list(prompts),
                 "date_created": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        "licenses": [],
        "categories": [{"id": c + 1, "name": p, "supercategory": "prompt"} for c, p in enumerate(prompts)],
    }
    with atomic_file(out) as f, tempfile.TemporaryFile("w+", encoding="utf-8", dir=out.parent) as spool:
        f.write(json.dumps(head)[:-1] + ', "images": [\n')
        for item in tally.keep(items, frozenset({DONE})):
            height, width = image_size(item_doc(item))
            image_id = item.index + 1
            f.write(("" if tally.written == 0 else ",\n") + json.dumps(
                {"id": image_id, "file_name": item.name, "width": width, "height": height}))
            tally.written += 1
            for answer in answers(item.doc, prompts, name=item.name):
                for inst in answer.instances:
                    spool.write(("" if tally.instances == 0 else ",\n") + json.dumps({
                        "id": tally.instances + 1, "image_id": image_id, "category_id": inst.category + 1,
                        "segmentation": inst.rle, "bbox": inst.bbox(), "area": inst.area(), "iscrowd": 0,
                        "score": inst.score, "slip_segment": inst.segment}))
                    tally.instances += 1
        f.write('\n], "annotations": [\n')
        spool.seek(0)
        shutil.copyfileobj(spool, f)
        f.write("\n]}\n")


def write_coco_results(
    items: Iterable[ExportItem],
    *,
    out: Path,
    prompts: Sequence[str],
    tally: Tally,
    image_ids: Mapping[str, int] | None = None,
    category_ids: Mapping[str, int] | None = None,
) -> None:
    """The ``coco-results`` list (module docstring), streamed; images not in ``image_ids`` are skipped."""
    categories = _category_ids(prompts, category_ids)
    unmatched = None
    with atomic_file(out) as f:
        f.write("[\n")
        for item in tally.keep(items, frozenset({DONE})):
            image_id = item.index + 1 if image_ids is None else image_ids.get(item.name)
            if image_id is None:
                tally.skipped += 1
                tally.note(f"{item.name}: not an image of the ground truth")
                unmatched = unmatched or item.name
                continue
            tally.written += 1
            for answer in answers(item_doc(item), prompts, name=item.name):
                for inst in answer.instances:
                    f.write(("" if tally.instances == 0 else ",\n") + json.dumps({
                        "image_id": image_id, "category_id": categories[inst.category],
                        "segmentation": inst.rle, "bbox": inst.bbox(), "score": inst.score}))
                    tally.instances += 1
        f.write("\n]\n")
        if unmatched is not None and tally.written == 0:
            raise DatasetError(f"no image of the job is in the ground truth (e.g. {unmatched!r} is not one of its "
                               "file names): submit the folder the ground truth's file_name paths are relative to")


def _category_ids(prompts: Sequence[str], category_ids: Mapping[str, int] | None) -> list[int]:
    """The category id of each prompt: by name from ``category_ids``, else prompt index + 1."""
    if category_ids is None:
        return list(range(1, len(prompts) + 1))
    missing = [p for p in prompts if p not in category_ids]
    if missing:
        known = ", ".join(list(category_ids)[:20])
        raise ConfigError(f"prompts {missing} are not categories of the ground truth (categories: {known}); "
                          "prompts are matched to categories by name")
    return [category_ids[p] for p in prompts]

