"""A job's results as files other people's training and evaluation code reads.

Formats (``write_export(items, format=...)``; each written as the items come, so memory does not grow
with the job; file formats appear under their final name only once complete):

* ``coco`` — a COCO instances dataset file: categories = prompts, every instance of every prompt an
  annotation with its ``score``; boxes ``pycocotools.mask.toBbox``, ``file_name`` the relative item name
  (:mod:`producer.exports_coco`);
* ``coco-results`` — the list ``COCO(gt).loadRes`` takes; ids from the ground truth's ``image_ids``
  (file name -> id) and ``category_ids`` (name = prompt -> id) when given (:func:`read_coco_ids`);
* ``jsonl`` — one record per image: state, name, per prompt its instances with box, area, score and RLE;
  failures with their reason (:mod:`producer.exports_shapes`);
* ``yolo`` — the Ultralytics segmentation layout, a folder: ``labels/<dir>/<stem>.txt`` (normalised
  polygons), ``data.yaml`` (class names in prompt order), ``images/`` only with ``copy_images``;
* ``polygons`` — one JSON Lines file, one GeoJSON FeatureCollection per image, pixel coordinates from
  ``cv2.findContours`` (holes kept as interior rings).

Items (:class:`ExportItem`) come from the ledger (``QueueClient.export_items``); other states than
``done`` and ``failed`` are skipped.

>>> summary = write_export(client.export_items(job), format="coco", out=Path("job.coco.json"),
...                        prompts=("circle", "star"), job_id=job)
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Sequence

from producer.exports_coco import CocoIds, read_coco_ids, write_coco, write_coco_results
from producer.exports_items import Answer, ExportItem, ExportSummary, Instance, Tally, answers
from producer.exports_shapes import mask_polygons, single_ring, write_jsonl, write_polygons, write_yolo
from slip.errors import ConfigError, InputError

FORMATS = ("coco", "coco-results", "jsonl", "yolo", "polygons")
FOLDER_FORMATS = frozenset({"yolo"})  # ``out`` is a folder; the others write one file

__all__ = [
    "FORMATS", "Answer", "CocoIds", "ExportItem", "ExportSummary", "Instance", "answers", "mask_polygons",
    "read_coco_ids", "single_ring", "write_export",
]


def write_export(
    items: Iterable[ExportItem],
    *,
    format: str,
    out: Path,
    prompts: Sequence[str],
    job_id: str,
    image_ids: Mapping[str, int] | None = None,
    category_ids: Mapping[str, int] | None = None,
    copy_images: bool = False,
) -> ExportSummary:
    """Write ``items`` as ``format`` to ``out`` (a file; a folder for ``yolo``); see the module docstring.

    ``image_ids`` / ``category_ids`` (``coco-results`` only): the ground truth's ids by file name and by
    category name; images not in ``image_ids`` are skipped. ``copy_images`` (``yolo`` only): also write
    ``OUT/images/<name>``. Raises :class:`ConfigError` for an unknown format or an option the format does
    not take, :class:`DatasetError` for a malformed result, :class:`InputError` when ``out`` cannot be
    written.
    """
    _check_options(format, image_ids, category_ids, copy_images)
    out, tally = Path(out), Tally()
    try:
        if format == "coco":
            write_coco(items, out=out, prompts=prompts, job_id=job_id, tally=tally)
        elif format == "coco-results":
            write_coco_results(items, out=out, prompts=prompts, tally=tally, image_ids=image_ids,
                               category_ids=category_ids)
        elif format == "jsonl":
            write_jsonl(items, out=out, prompts=prompts, tally=tally)
        elif format == "polygons":
            write_polygons(items, out=out, prompts=prompts, tally=tally)
        else:
            write_yolo(items, out=out, prompts=prompts, job_id=job_id, tally=tally, copy_images=copy_images)
    except OSError as e:
        raise InputError(f"cannot write {e.filename or out}: {e.strerror or e}") from e
    paths = (out / "labels", out / "data.yaml") if format in FOLDER_FORMATS else (out,)
    if copy_images:
        paths += (out / "images",)
    return tally.summary(format, *paths)


def _check_options(format: str, image_ids, category_ids, copy_images: bool) -> None:
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}: use one of {', '.join(FORMATS)}")
    if (image_ids is not None or category_ids is not None) and format != "coco-results":
        raise ConfigError("ground-truth ids (--image-ids-from) apply to --format coco-results only")
    if copy_images and format != "yolo":
        raise ConfigError("--copy-images applies to --format yolo only")
