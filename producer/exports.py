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
* ``yolo`` — an Ultralytics segmentation dataset, a folder: ``images/{train,val}/`` (copies or symlinks,
  ``images="copy" | "link"``, required), ``labels/{train,val}/<dir>/<stem>.txt`` (normalised polygons), a
  seeded ``val_fraction`` split, ``data.yaml`` (class names in prompt order) written last
  (:mod:`producer.exports_yolo`);
* ``polygons`` — one JSON Lines file, one GeoJSON FeatureCollection per image, pixel coordinates from
  ``cv2.findContours`` (holes kept as interior rings);
* ``label-studio`` / ``cvat`` — pre-annotations for review in a labelling tool: Label Studio tasks with
  predictions (``shape`` brush | polygon, images at ``image_base`` + name; :mod:`producer.exports_labelstudio`)
  and CVAT for images 1.1 XML (``shape`` mask | polygon; :mod:`producer.exports_cvat`).

Items (:class:`ExportItem`) come from the ledger (``QueueClient.export_items``); other states than
``done`` and ``failed`` are skipped. ``min_score`` (``coco`` and ``yolo``, the formats one trains on)
leaves out every image with a chosen instance scoring under it (the whole image: an object that was
there must not become background); the summary counts them (``uncertain``).

>>> summary = write_export(client.export_items(job), format="coco", out=Path("job.coco.json"),
...                        prompts=("circle", "star"), job_id=job)
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Sequence

from producer.exports_coco import CocoIds, read_coco_ids, write_coco, write_coco_results
from producer.exports_labelstudio import REVIEW_FORMATS, write_review_format
from producer.exports_items import Answer, ExportItem, ExportSummary, Instance, Tally, answers
from producer.exports_shapes import mask_polygons, single_ring, write_jsonl, write_polygons
from producer.exports_yolo import IMAGE_MODES, write_yolo
from slip.errors import ConfigError, InputError

FORMATS = ("coco", "coco-results", "jsonl", "yolo", "polygons", "label-studio", "cvat")
FOLDER_FORMATS = frozenset({"yolo"})  # ``out`` is a folder; the others write one file
TRAINING_FORMATS = frozenset({"coco", "yolo"})  # the formats --min-score applies to
DEFAULT_VAL_FRACTION = 0.1  # yolo: share of the images in val (Ultralytics' autosplit default)

__all__ = [
    "DEFAULT_VAL_FRACTION", "FORMATS", "IMAGE_MODES", "Answer", "CocoIds", "ExportItem", "ExportSummary",
    "Instance", "answers", "mask_polygons", "read_coco_ids", "single_ring", "write_export",
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
    images: str | None = None,
    val_fraction: float | None = None,
    seed: int | None = None,
    min_score: float | None = None,
    image_base: str | None = None,
    shape: str | None = None,
) -> ExportSummary:
    """Write ``items`` as ``format`` to ``out`` (a file; a folder for ``yolo``); see the module docstring.

    ``image_ids`` / ``category_ids`` (``coco-results`` only): the ground truth's ids by file name and by
    category name; images not in ``image_ids`` are skipped. ``images`` (``yolo`` only, required there):
    ``"copy"`` the images into ``OUT/images/`` or ``"link"`` them (symlinks to ``ExportItem.image_file``).
    ``val_fraction`` / ``seed`` (``yolo``; None = 0.1 / 0): the seeded train / val split. ``min_score`` (``coco``, ``yolo``):
    leave out images with an instance under it. Raises :class:`ConfigError` for an unknown format or an
    option the format does not take, :class:`DatasetError` for a malformed result or a YOLO export with no
    image, :class:`InputError` when ``out`` cannot be written.
    """
    _check_options(format, image_ids, category_ids, images, min_score, val_fraction, seed, image_base, shape)
    out, tally = Path(out), Tally()
    items = tally.confident(items, prompts, min_score)
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
        elif format in REVIEW_FORMATS:  # label-studio, cvat: pre-annotations to review (issue 18)
            paths = write_review_format(items, format=format, out=out, prompts=prompts, job_id=job_id, tally=tally,
                                        image_base=image_base, shape=shape)
        else:
            write_yolo(items, out=out, prompts=prompts, job_id=job_id, tally=tally, images=images,
                       val_fraction=DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction, seed=seed or 0)
    except OSError as e:
        raise InputError(f"cannot write {e.filename or out}: {e.strerror or e}") from e
    if format not in REVIEW_FORMATS:
        paths = (out / "images", out / "labels", out / "data.yaml") if format in FOLDER_FORMATS else (out,)
    return tally.summary(format, *paths)


def _check_options(format: str, image_ids, category_ids, images: str | None, min_score: float | None,
                   val_fraction: float | None, seed: int | None, image_base: str | None = None,
                   shape: str | None = None) -> None:
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}: use one of {', '.join(FORMATS)}")
    if (image_ids is not None or category_ids is not None) and format != "coco-results":
        raise ConfigError("ground-truth ids (--image-ids-from) apply to --format coco-results only")
    if images is not None and format != "yolo":
        raise ConfigError("--copy-images / --link-images apply to --format yolo only")
    if (val_fraction is not None or seed is not None) and format != "yolo":
        raise ConfigError("--val-fraction / --seed apply to --format yolo only")
    if format not in REVIEW_FORMATS and (image_base is not None or shape is not None):
        raise ConfigError("--image-base / --shape apply to --format label-studio and cvat only")
    if min_score is not None and format not in TRAINING_FORMATS:
        raise ConfigError("--min-score applies to --format coco and yolo only (the others keep every answer "
                          "with its score)")
