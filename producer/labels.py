"""``slip labels import``: a reviewed export back as ground truth (:mod:`slip.review`'s labels folder).

Sources (``--from``):

* ``label-studio`` — Label Studio's JSON export of a project whose tasks came from ``slip results
  --format label-studio`` (each task keeps ``data.slip_name``). A task is *reviewed* when it has an
  annotation that was not cancelled (skipped); the latest one counts. Its ``brushlabels`` (RLE) and
  ``polygonlabels`` results are the objects; other result types (choices, text, ...) are ignored.
* ``cvat`` — a "CVAT for images 1.1" XML file (export the jobs you finished); every image in it is
  reviewed; its ``mask`` and ``polygon`` shapes are the objects (boxes, points, tags are ignored).
* ``coco`` — a COCO instances file (RLE or polygon segmentations); every image in it is reviewed.

Every object's label must be one of the job's prompts and every image one of the job's items (by name, or by the
end of its name that no other item shares: a tool that kept only the file name, or put its own folder in front),
with the job's image size. The whole export is checked before anything is written: a malformed, foreign
or mismatched export, or one with no reviewed item, is one :class:`DatasetError` line naming the file
and the problem, and nothing is imported.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from producer.exports_cvat import runs_mask
from producer.exports_items import ExportItem, image_size
from producer.exports_labelstudio import brush_mask
from slip.errors import DatasetError
from slip.inputs import match_files, name_parts
from slip.review import REVIEW_FILE, ReviewedImage, ReviewedObject, read_labels, rle_of, write_labels

SOURCES = ("label-studio", "cvat", "coco")
REVIEW_LABELS = "labels"  # the labels folder inside a `slip review` folder


@dataclass(frozen=True)
class Parsed:
    """What a reviewed export says, before it is checked against the job."""

    images: list[dict]  # {"name", "height", "width", "objects": [(label, (H, W) bool)], "annotator", "updated_at", "where"}
    unreviewed: int  # images or tasks in the export that nobody reviewed


@dataclass(frozen=True)
class JobImages:
    """What the import needs from the job: its prompts, and its items by name (only the reviewed ones are
    kept: :meth:`collect`)."""

    job: str | None  # the job id (None: a folder of images)
    prompts: tuple[str, ...]
    items: Callable[[], Iterable[ExportItem]]  # every item of the job (or the folder), streamed

    def match(self, names: Sequence[str]) -> dict[str, ExportItem]:
        """``{name: item}`` for each of an export's image ``names`` that names an item of the job: its own name,
        or a tail of it that no other item shares (a tool that dropped the folders, or put its own in front:
        :func:`slip.inputs.match_files`). One pass over the job, keeping the items whose file name is one of
        the names'."""
        wanted = {name_parts(n)[-1:] for n in names}
        candidates = [item for item in self.items() if name_parts(item.name)[-1:] in wanted]
        found = match_files(list(names), [c.name for c in candidates])
        return {names[i]: candidates[j] for i, j in found.items()}


def import_labels(export: Path, *, source: str, out: Path, job: JobImages, heldout: float = 0.2,
                  seed: int = 0) -> tuple[Path, int, int]:
    """Check ``export`` against ``job`` and write the labels folder ``out``; returns ``(out, reviewed,
    unreviewed)``. DatasetError (one line, naming the file) for any problem; nothing is written then."""
    export = Path(export)
    parsed = parse_export(export, source)
    if not parsed.images:
        raise DatasetError(f"{export}: no reviewed item ({parsed.unreviewed} not reviewed): nothing to import")
    reviewed, by_name = _check(export, parsed, job)

    def image(r: ReviewedImage) -> bytes:
        item = by_name[r.name]
        if item.image is None:
            raise DatasetError(f"{export}: the job gives no image for {r.name}")
        return item.image()

    def proposals(r: ReviewedImage) -> list | None:
        doc = by_name[r.name].doc
        return None if doc is None else doc.get("segments")

    write_labels(out, reviewed, prompts=job.prompts, image=image, proposals=proposals, source=source,
                 export=str(export), job=job.job, unreviewed=parsed.unreviewed, heldout_fraction=heldout, seed=seed)
    return out, len(reviewed), parsed.unreviewed


def reviewed_before(folders: Iterable[Path]) -> frozenset[str]:
    """The names of the images reviewed in earlier rounds: each folder a ``slip review`` folder (its
    ``labels/``) or a ``slip labels import`` folder; both splits count. One DatasetError line for a folder that is
    neither."""
    names: set[str] = set()
    for folder in map(Path, folders):
        labels = folder / REVIEW_LABELS if (folder / REVIEW_LABELS / REVIEW_FILE).is_file() else folder
        if not (labels / REVIEW_FILE).is_file():
            raise DatasetError(f"{folder} holds no earlier review: expected a `slip review` folder "
                               f"({folder / REVIEW_LABELS / REVIEW_FILE}) or a `slip labels import` folder "
                               f"({folder / REVIEW_FILE})")
        names.update(item["name"] for item in read_labels(labels).items)
    return frozenset(names)


def _check(export: Path, parsed: Parsed, job: JobImages) -> tuple[list[ReviewedImage], dict[str, ExportItem]]:
    """Every label a prompt, every image an item of the job with its size; the reviewed images (named as in the
    job) and their items by that name."""
    prompts = set(job.prompts)
    for image in parsed.images:
        for label, _ in image["objects"]:
            if label not in prompts:
                raise DatasetError(f"{export}: label {label!r} ({image['where']}) is not a prompt of "
                                   f"{_what(job)} (prompts: {', '.join(job.prompts)})")
    names = [i["name"] for i in parsed.images]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise DatasetError(f"{export}: image {twice!r} is reviewed twice in the export")
    items = job.match(names)
    missing = [i for i in parsed.images if i["name"] not in items]
    if missing:
        raise DatasetError(f"{export}: {len(missing)} reviewed image(s) are not in {_what(job)}, e.g. "
                           f"{missing[0]['name']!r} ({missing[0]['where']}): wrong export or wrong job")
    reviewed = []
    for image in parsed.images:
        item = items[image["name"]]
        image["name"] = item.name  # the job's name for it, whatever the tool called it
        size = image_size(item.doc) if item.state == "done" and item.doc is not None else _read_size(export, item)
        if image["height"] == 0:  # a reviewed task that kept no object and carries no size
            image["height"], image["width"] = size
        if size != (image["height"], image["width"]):
            raise DatasetError(f"{export}: {image['name']} is {image['width']}x{image['height']} in the export "
                               f"but {size[1]}x{size[0]} in {_what(job)}: wrong export or wrong job")
        objects = tuple(ReviewedObject(label, rle_of(mask)) for label, mask in image["objects"])
        reviewed.append(ReviewedImage(image["name"], item.index, image["height"], image["width"], objects,
                                      image.get("annotator"), image.get("updated_at")))
    return reviewed, {item.name: item for item in items.values()}


def _read_size(export: Path, item: ExportItem) -> tuple[int, int]:
    """``(H, W)`` of an item's image from its header (a folder of images: no segments.json to ask)."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(item.image())) as im:
            return im.height, im.width
    except (OSError, UnidentifiedImageError, TypeError) as e:
        raise DatasetError(f"{export}: cannot read the image {item.name}: {e}") from e


def _what(job: JobImages) -> str:
    return f"job {job.job}" if job.job else "the image folder"


def parse_export(path: Path, source: str) -> Parsed:
    """Read a reviewed export of ``source`` (:data:`SOURCES`); DatasetError when it is not one."""
    if source not in SOURCES:
        raise DatasetError(f"unknown --from {source!r}: use one of {', '.join(SOURCES)}")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from e
    if not text.strip():
        raise DatasetError(f"{path} is empty: not a {source} export")
    looks = "xml" if text.lstrip().startswith("<") else "json"
    if source == "cvat":
        if looks != "xml":
            raise DatasetError(f"{path} is JSON, not CVAT XML: use --from label-studio or --from coco")
        return _parse_cvat(path, text)
    if looks == "xml":
        raise DatasetError(f"{path} is XML, not a {source} JSON export: use --from cvat")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not valid JSON ({e}): a truncated or damaged export") from e
    if source == "label-studio":
        if isinstance(data, dict) and "annotations" in data and "images" in data:
            raise DatasetError(f"{path} is a COCO file, not a Label Studio JSON export: use --from coco")
        return _parse_label_studio(path, data)
    if isinstance(data, list):
        raise DatasetError(f"{path} is a list (a Label Studio export?), not a COCO file: use --from label-studio")
    return _parse_coco(path, data)


# --- Label Studio ----------------------------------------------------------------------------------


def _parse_label_studio(path: Path, tasks) -> Parsed:
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise DatasetError(f"{path} is not a Label Studio JSON export (a list of tasks)")
    images, unreviewed = [], 0
    for n, task in enumerate(tasks):
        where = f"task {task.get('id', n + 1)}"
        annotations = [a for a in task.get("annotations") or () if isinstance(a, dict) and not a.get("was_cancelled")]
        if not annotations:
            unreviewed += 1
            continue
        data = task.get("data") if isinstance(task.get("data"), dict) else {}
        name = data.get("slip_name")
        if not isinstance(name, str):
            raise DatasetError(f"{path}: {where} has no data.slip_name: not a task of `slip results --format "
                               f"label-studio` (export the project as JSON, not JSON-MIN or another format)")
        latest = max(annotations, key=lambda a: (str(a.get("updated_at") or ""), a.get("id") or 0))
        try:
            objects, size = _ls_objects(latest.get("result") or [])
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise DatasetError(f"{path}: {where} has a malformed result ({type(e).__name__}: {e})") from e
        except DatasetError as e:
            raise DatasetError(f"{path}: {where}: {e}") from e
        if size is None:
            size = _ls_size(task)
        images.append({"name": name, "height": size[0], "width": size[1], "objects": objects, "where": where,
                       "annotator": _annotator(latest), "updated_at": latest.get("updated_at")})
    return Parsed(images, unreviewed)


def _ls_objects(results: list) -> tuple[list, tuple[int, int] | None]:
    objects, size = [], None
    for result in results:
        kind = str(result.get("type", "")).lower()
        if kind not in ("brushlabels", "polygonlabels"):
            continue
        height, width = int(result["original_height"]), int(result["original_width"])
        size = size or (height, width)
        value = result["value"]
        labels = value[kind]
        if len(labels) != 1:
            raise DatasetError(f"a {kind} result has {len(labels)} labels; give each object exactly one")
        if kind == "brushlabels":
            if value.get("format", "rle") != "rle":
                raise DatasetError(f"brush format {value.get('format')!r} is not rle")
            mask = brush_mask(value["rle"], height, width)
        else:
            points = np.array(value["points"], np.float64) * np.array([width, height]) / 100.0 - 0.5
            mask = polygon_mask(points, height, width)
        objects.append((str(labels[0]), mask))
    return objects, size


def _ls_size(task: dict) -> tuple[int, int]:
    """A reviewed task whose annotation kept no object: its size from our prediction."""
    for prediction in task.get("predictions") or ():
        for result in prediction.get("result") or ():
            if "original_height" in result:
                return int(result["original_height"]), int(result["original_width"])
    return (0, 0)


def _annotator(annotation: dict) -> str | None:
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    return None if who is None else str(who)


def polygon_mask(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """``(K, 2)`` XY pixel coordinates (pixel centres at integers) -> the filled ``(H, W) bool`` polygon."""
    canvas = np.zeros((height, width), np.uint8)
    if len(points) >= 3:
        cv2.fillPoly(canvas, [np.round(points).astype(np.int32).reshape(-1, 1, 2)], 1)
    return canvas.astype(bool)


# --- CVAT ------------------------------------------------------------------------------------------


def _parse_cvat(path: Path, text: str) -> Parsed:
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise DatasetError(f"{path} is not valid XML ({e}): a truncated or damaged export") from e
    if root.tag != "annotations" or root.findtext("version") not in ("1.1",):
        raise DatasetError(f"{path} is not a 'CVAT for images 1.1' file (root <{root.tag}>, version "
                           f"{root.findtext('version')!r}); export the task as 'CVAT for images 1.1'")
    images = []
    for node in root.iter("image"):
        where = f"image id {node.get('id')}"
        try:
            name, height, width = node.attrib["name"], int(node.attrib["height"]), int(node.attrib["width"])
            objects = []
            for shape in node:
                if shape.tag == "mask":
                    box = tuple(int(shape.attrib[k]) for k in ("left", "top", "width", "height"))
                    runs = [int(v) for v in shape.attrib["rle"].split(",")]
                    objects.append((shape.attrib["label"], runs_mask(runs, box, height, width)))
                elif shape.tag == "polygon":
                    pairs = [p.split(",") for p in shape.attrib["points"].split(";")]
                    points = np.array([[float(x), float(y)] for x, y in pairs])
                    objects.append((shape.attrib["label"], polygon_mask(points, height, width)))
        except (KeyError, ValueError) as e:
            raise DatasetError(f"{path}: {where} is malformed ({type(e).__name__}: {e})") from e
        images.append({"name": name, "height": height, "width": width, "objects": objects, "where": where})
    return Parsed(images, 0)


# --- COCO ------------------------------------------------------------------------------------------


def _parse_coco(path: Path, data) -> Parsed:
    try:
        categories = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        images = {int(i["id"]): {"name": str(i["file_name"]), "height": int(i["height"]), "width": int(i["width"]),
                                 "objects": [], "where": f"image id {i['id']}"} for i in data["images"]}
        for ann in data["annotations"]:
            image = images[int(ann["image_id"])]
            mask = _coco_mask(ann["segmentation"], image["height"], image["width"])
            images[int(ann["image_id"])]["objects"].append((categories[int(ann["category_id"])], mask))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DatasetError(f"{path} is not a COCO instances file with segmentations ({type(e).__name__}: {e})") from e
    return Parsed(list(images.values()), 0)


def _coco_mask(segmentation, height: int, width: int) -> np.ndarray:
    if isinstance(segmentation, list):  # polygons
        rles = mask_utils.frPyObjects(segmentation, height, width)
        return mask_utils.decode(mask_utils.merge(rles)).astype(bool)
    if isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        segmentation = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation.get("counts"), str):
        segmentation = {"size": segmentation["size"], "counts": segmentation["counts"].encode("ascii")}
    mask = mask_utils.decode(segmentation).astype(bool)
    if mask.shape != (height, width):
        raise ValueError(f"a mask is {mask.shape[1]}x{mask.shape[0]} in a {width}x{height} image")
    return mask


# --- sources of images -----------------------------------------------------------------------------


def folder_images(root: Path, prompts: Sequence[str]) -> JobImages:
    """A folder of images (item names relative to it) as the job to check an export against."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist")

    def items() -> Iterable[ExportItem]:
        for k, path in enumerate(sorted(p for p in root.rglob("*") if p.is_file())):
            yield ExportItem(index=k, name=path.relative_to(root).as_posix(), state="folder", doc=None, reason=None,
                             image=lambda p=path: p.read_bytes())

    return JobImages(None, tuple(prompts), items)
