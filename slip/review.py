"""The review loop's library side: how doubtful a result is, reviewed labels on disk, and what a ranker
does on the reviewed images.

**Doubt.** For one prompt with segment similarities ``s`` (the ranker's cosine scores, ``(N,)``, sorted
best first) and a threshold ``t`` (None = none), its *certainty* is ``min(s[0] - s[1], |s[0] - t|)``: the
margin between the best and the second-best segment (which segment is the object) and the distance of the
best one to the threshold (is the object there at all); without a threshold, the margin alone; 1.0 stands
in for a missing second segment, and a prompt with no segment at all has certainty 0. An image's *doubt*
is ``sum over its prompts of exp(-certainty / DOUBT_SCALE)``: each prompt adds up to 1 when its answer is
a coin toss and about 0 once it is clear (:data:`DOUBT_SCALE` = 0.05, a typical cosine margin), so the
doubt counts the image's doubtful answers (:func:`image_doubt`). Its *unclaimed* segments are those no prompt
claims: ``sum over segments of sigmoid(-max_p(s_jp - t_p) / DOUBT_SCALE)`` (:func:`unclaimed`; prompts with a
threshold only, 0 without any): a segment far below every prompt's threshold counts 1 (an object the ranker
cannot name: a class it never learnt, or background), one above some threshold 0. The review order
(:func:`doubt_order`) is by *expected corrections*, doubt + unclaimed (:func:`expected_corrections`), the
most first, ties in job order: the images where a reviewer has the most to correct. (Chosen on two
development jobs of ``bench/review.py`` among six rules: three beat random order at 25 and 50 reviewed images
on both, and this one keeps the per-prompt doubt; the earlier rule, the prompts in turn each taking its least certain image, lost to random on
one of them: ``bench/results/review-rules*.json``.)

**Reviewed labels** (a folder :func:`write_labels` writes and ``slip train-ranker`` reads as is)::

    LABELS/classes.json               {"format": "slip-labels", "classes": [{"name": prompt, "dir"}]}
    LABELS/<class dir>/<k>-<stem>-<j>.png / .mask.png   one crop per corrected object (train split)
    LABELS/_background/<k>-<stem>-n<j>.png / .mask.png  proposals the reviewer rejected ("background")
    LABELS/.heldout/<class dir>/...   the crops of the held-out reviewed images (not trained on)
    LABELS/instances.coco.json        COCO instances of every reviewed image (file_name = the job's item name,
                                      categories = the prompts, RLE masks)
    LABELS/review.json                which items were reviewed: {"format": "slip-review", "version", "source",
                                      "export", "job", "prompts", "heldout_fraction", "seed", "unreviewed",
                                      "items": [{"name", "index", "id", "split": "train" | "heldout",
                                                 "objects", "annotator", "updated_at", "image", "proposals"}]}
    LABELS/.images/<id>.<ext>         the reviewed images (crops and calibration are cut from them)
    LABELS/.proposals/<id>.json       the job's segments of that image (segments.json "segments"), when known

A crop is the object's box grown by :data:`CROP_CONTEXT` of its side on each side, made square, with its
mask beside it, so training sees the whole-crop view and the cut-out segment view the pipeline ranks.
When the job's proposals are known, up to :data:`NEGATIVES` proposals per image that the reviewer did not
keep (IoU <= 0.5 with every kept object: backgrounds, parts, neighbours), those the ranker scored highest
for some prompt first, become crops of one more class, ``background``: fine-tuning then pushes the
segments it confused away from every prompt (the ranker's argmax errors are such confusions).
Hidden folders are not classes to :func:`slip.data.folder.scan_folder`. The folder is written under a
temporary name and renamed when complete: a failed import leaves nothing.

**A ranker on the reviewed images** (:func:`score_reviewed`): the job's proposals of each reviewed image
are ranked against the prompts; a prompt is answered right when its best segment has IoU > 0.5 with the
corrected mask (object-level, as in :mod:`slip.evaluate`). The same probes calibrate the ranker's
threshold (:func:`calibrate_reviewed`, the F1 rule of :mod:`slip.calibrate`), fitted on the train split
and reported on the held-out one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from slip.errors import ConfigError, DatasetError

LABELS_FORMAT, REVIEW_FORMAT, REVIEW_VERSION = "slip-labels", "slip-review", 1
REVIEW_FILE, COCO_FILE, CLASSES_FILE = "review.json", "instances.coco.json", "classes.json"
HELDOUT_DIR, IMAGES_DIR, PROPOSALS_DIR = ".heldout", ".images", ".proposals"
CROP_CONTEXT = 0.1  # a crop is the object's box grown by this fraction of its side, on each side
MISSING = 1.0  # certainty of a margin that does not exist (a single segment)
DOUBT_SCALE = 0.05  # cosine certainty at which a prompt's doubt has fallen to 1/e
BACKGROUND, BACKGROUND_DIR = "background", "_background"  # the class of rejected proposals (hard negatives)
NEGATIVES = 4  # rejected proposals per reviewed image kept as background crops
NEGATIVE_IOU = 0.5  # a proposal with IoU above this with a kept object is that object, not a negative


# --- doubt ---------------------------------------------------------------------------------------------


def prompt_certainty(scores: np.ndarray, threshold: float | None) -> float:
    """``min(best - second, |best - threshold|)`` of one prompt's ``(N,)`` segment scores (module docstring)."""
    scores = np.sort(np.asarray(scores, np.float64))[::-1]
    if scores.size == 0:
        return 0.0
    margin = float(scores[0] - scores[1]) if scores.size > 1 else MISSING
    return min(margin, abs(float(scores[0]) - threshold)) if threshold is not None else margin


def image_doubt(similarity: np.ndarray, thresholds: Sequence[float | None]) -> float:
    """How many of an image's answers are in doubt, softly: ``sum_p exp(-certainty_p / DOUBT_SCALE)`` over
    the prompts, in ``[0, P]``; ``similarity`` is ``(N, P)`` segments x prompts (module docstring)."""
    similarity = np.asarray(similarity, np.float64).reshape(-1, len(thresholds))
    return float(sum(math.exp(-prompt_certainty(similarity[:, p], t) / DOUBT_SCALE) for p, t in enumerate(thresholds)))


def unclaimed(similarity: np.ndarray, thresholds: Sequence[float | None]) -> float:
    """Segments no prompt claims, softly: ``sum_j sigmoid(-max_p(s_jp - t_p) / DOUBT_SCALE)`` over the ``(N, P)``
    segments x prompts ``similarity``, prompts with a threshold only; 0.0 when none has one (module docstring)."""
    similarity = np.asarray(similarity, np.float64).reshape(-1, len(thresholds))
    known = [p for p, t in enumerate(thresholds) if t is not None]
    if not known or not len(similarity):
        return 0.0
    margin = (similarity[:, known] - np.array([thresholds[p] for p in known], np.float64)).max(1)
    return float((1.0 / (1.0 + np.exp(np.clip(margin / DOUBT_SCALE, -50.0, 50.0)))).sum())


def expected_corrections(similarity: np.ndarray, thresholds: Sequence[float | None]) -> float:
    """:func:`image_doubt` + :func:`unclaimed`: how much a reviewer may have to correct on the image."""
    return image_doubt(similarity, thresholds) + unclaimed(similarity, thresholds)


def doubt_order(corrections: Sequence[float], limit: int | None = None) -> list[int]:
    """Indices of ``corrections`` (per image, :func:`expected_corrections`) in review order: the most first,
    ties to the lower index; at most ``limit``."""
    values = np.asarray(corrections, np.float64).reshape(-1)
    order = np.lexsort((np.arange(len(values)), -values))
    return [int(i) for i in order[: len(values) if limit is None else limit]]


# --- reviewed labels -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReviewedObject:
    """One object a reviewer kept or drew."""

    prompt: str  # its label: one of the job's prompts
    rle: dict  # COCO RLE {"size": [H, W], "counts": str} of its mask, image size


@dataclass(frozen=True)
class ReviewedImage:
    """One reviewed image of a job, as the labelling tool gave it back."""

    name: str  # the job's item name (relative path, "/")
    index: int | None  # position in the job's manifest (None: not from a job)
    height: int
    width: int
    objects: tuple[ReviewedObject, ...]  # () = the reviewer found none of the prompts here
    annotator: str | None = None  # who reviewed it (as the tool records it)
    updated_at: str | None = None  # when (as the tool records it)


@dataclass(frozen=True)
class Labels:
    """A reviewed-labels folder, read back (:func:`read_labels`)."""

    root: Path
    prompts: tuple[str, ...]
    review: dict  # review.json
    items: tuple[dict, ...] = field(default=())  # review.json "items"

    def split(self, name: str) -> tuple[dict, ...]:
        """The items of split ``name`` ("train" | "heldout" | "all")."""
        return self.items if name == "all" else tuple(i for i in self.items if i["split"] == name)

    def truth(self, item: dict) -> dict[str, np.ndarray]:
        """``{prompt: (H, W) bool}`` of an item: the union of its objects per prompt (all False: absent)."""
        coco = self._coco()
        h, w = item["height"], item["width"]
        masks = {p: np.zeros((h, w), bool) for p in self.prompts}
        for ann in coco["by_image"].get(item["id"], ()):
            masks[self.prompts[ann["category_id"] - 1]] |= mask_utils.decode(_coded(ann["segmentation"])).astype(bool)
        return masks

    def image(self, item: dict) -> np.ndarray:
        """``(H, W, 3) uint8`` RGB of a reviewed image."""
        from slip.data.folder import load_rgb

        return load_rgb(self.root / item["image"])

    def proposals(self, item: dict) -> list[dict] | None:
        """The job's segment records of an item (``segments.json`` "segments"), None when not kept."""
        if not item.get("proposals"):
            return None
        return json.loads((self.root / item["proposals"]).read_text())

    def _coco(self) -> dict:
        if not hasattr(self, "_cache"):
            data = json.loads((self.root / COCO_FILE).read_text())
            by_image: dict[int, list] = {}
            for ann in data["annotations"]:
                by_image.setdefault(ann["image_id"], []).append(ann)
            object.__setattr__(self, "_cache", {"by_image": by_image})
        return self._cache


def write_labels(out: Path, reviewed: Sequence[ReviewedImage], *, prompts: Sequence[str],
                 image: Callable[[ReviewedImage], bytes], proposals: Callable[[ReviewedImage], list | None],
                 source: str, export: str, job: str | None, unreviewed: int = 0, heldout_fraction: float = 0.2,
                 seed: int = 0, negatives: int = NEGATIVES) -> Path:
    """Write the labels folder (module docstring) of ``reviewed`` to ``out`` (new or empty), atomically.

    ``image(r)`` returns the encoded image bytes of a reviewed image, ``proposals(r)`` its segment records
    (or None). ``heldout_fraction`` of the images (seeded, at least one when there are 5 or more) go to the
    held-out split. ``negatives``: rejected proposals per image written as the background class (0: none).
    DatasetError for an empty review; ConfigError for an ``out`` that is not empty.
    """
    out = Path(out)
    if not reviewed:
        raise DatasetError(f"{export}: no reviewed item: nothing to import")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not empty: give a new --out folder for the labels")
    if not 0.0 <= heldout_fraction < 1.0:
        raise ConfigError(f"--heldout must be a fraction in [0, 1), got {heldout_fraction}")
    dirs = _class_dirs(prompts)
    heldout = _heldout(len(reviewed), heldout_fraction, seed)
    work = out.with_name(f".{out.name}.partial")
    shutil.rmtree(work, ignore_errors=True)
    try:
        items, coco = [], _coco_head(prompts, job)
        for k, r in enumerate(reviewed):
            split = "heldout" if k in heldout else "train"
            items.append(_write_item(work, k, r, split, image(r), proposals(r), prompts, dirs, coco, negatives))
        classes = [{"name": p, "dir": dirs[p]} for p in prompts]
        if any((root / BACKGROUND_DIR).is_dir() for root in (work, work / HELDOUT_DIR)):
            classes.append({"name": BACKGROUND, "dir": BACKGROUND_DIR})
        (work / CLASSES_FILE).write_text(json.dumps({"format": LABELS_FORMAT, "classes": classes}, indent=1))
        (work / COCO_FILE).write_text(json.dumps(coco))
        review = {"format": REVIEW_FORMAT, "version": REVIEW_VERSION, "source": source, "export": export, "job": job,
                  "prompts": list(prompts), "heldout_fraction": heldout_fraction, "seed": seed,
                  "unreviewed": unreviewed, "items": items}
        (work / REVIEW_FILE).write_text(json.dumps(review, indent=1))
        if out.exists():
            out.rmdir()
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out


def _class_dirs(prompts: Sequence[str]) -> dict[str, str]:
    """A safe, distinct directory name per prompt (``a dog`` -> ``a_dog``)."""
    dirs: dict[str, str] = {}
    for p in prompts:
        base = "".join(c if c.isalnum() or c in "-_" else "_" for c in p.strip()).strip("._") or "class"
        name, k = base, 1
        while name in dirs.values():
            k += 1
            name = f"{base}-{k}"
        dirs[p] = name
    return dirs


def _heldout(count: int, fraction: float, seed: int) -> set[int]:
    k = round(count * fraction)
    if fraction > 0 and count >= 5:
        k = max(k, 1)
    return {int(i) for i in np.random.default_rng([seed, 18]).permutation(count)[:k]}


def _coco_head(prompts: Sequence[str], job: str | None) -> dict:
    return {"info": {"description": "SLIP reviewed labels", "job_id": job}, "licenses": [],
            "categories": [{"id": c + 1, "name": p, "supercategory": "prompt"} for c, p in enumerate(prompts)],
            "images": [], "annotations": []}


def _write_item(work: Path, k: int, r: ReviewedImage, split: str, data: bytes, segments: list | None,
                prompts: Sequence[str], dirs: dict[str, str], coco: dict, negatives: int) -> dict:
    """One reviewed image: its picture, proposals, crops and COCO records; returns its review.json item."""
    ext = os.path.splitext(r.name)[1].lower() or ".png"
    image_rel = f"{IMAGES_DIR}/{k:06d}{ext}"
    _put(work / image_rel, data)
    proposals_rel = None
    if segments is not None:
        proposals_rel = f"{PROPOSALS_DIR}/{k:06d}.json"
        _put(work / proposals_rel, json.dumps(segments).encode())
    rgb = _decode(data, r)
    coco["images"].append({"id": k + 1, "file_name": r.name, "width": r.width, "height": r.height})
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(r.name).stem)[:60]
    root = work / HELDOUT_DIR if split == "heldout" else work
    for j, obj in enumerate(r.objects):
        mask = mask_utils.decode(_coded(obj.rle)).astype(bool)
        coco["annotations"].append({
            "id": len(coco["annotations"]) + 1, "image_id": k + 1, "category_id": prompts.index(obj.prompt) + 1,
            "segmentation": obj.rle, "area": int(mask.sum()), "iscrowd": 0,
            "bbox": [float(v) for v in mask_utils.toBbox(_coded(obj.rle))]})
        if mask.any():
            write_crop(root / dirs[obj.prompt] / f"{k:06d}-{stem}-{j}.png", rgb, mask)
    for j, mask in enumerate(_rejected(segments, r, prompts, negatives) if segments else ()):
        write_crop(root / BACKGROUND_DIR / f"{k:06d}-{stem}-n{j}.png", rgb, mask)
    return {"name": r.name, "index": r.index, "id": k + 1, "split": split, "objects": len(r.objects),
            "height": r.height, "width": r.width, "annotator": r.annotator, "updated_at": r.updated_at,
            "image": image_rel, "proposals": proposals_rel}


def _rejected(segments: list, r: ReviewedImage, prompts: Sequence[str], count: int) -> list[np.ndarray]:
    """Masks of the job's proposals the reviewer did not keep (IoU <= 0.5 with every kept object), the
    ``count`` the ranker found most like one of the prompts first (the confusions worth learning from)."""
    if count <= 0:
        return []
    kept = [mask_utils.decode(_coded(o.rle)).astype(bool) for o in r.objects]
    scored = []
    for seg in segments:
        mask = mask_utils.decode(_coded(seg["segmentation"])).astype(bool)
        if not mask.any() or any((mask & k).sum() / max((mask | k).sum(), 1) > NEGATIVE_IOU for k in kept):
            continue
        similarity = seg.get("similarity") or {}
        scored.append((-max((float(similarity.get(p, -1.0)) for p in prompts), default=-1.0), len(scored), mask))
    return [mask for _, _, mask in sorted(scored, key=lambda t: t[:2])[:count]]


def write_crop(path: Path, image: np.ndarray, mask: np.ndarray) -> None:
    """:func:`object_crop` of ``(H, W, 3) uint8`` ``image`` around ``(H, W) bool`` ``mask``, written as the PNG
    ``path`` with its mask beside it (``<stem>.mask.png``, 0 / 255): one training crop of a labels folder."""
    crop, crop_mask = object_crop(image, mask)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(crop).save(path, compress_level=1)
    Image.fromarray(crop_mask.astype(np.uint8) * 255).save(path.with_name(path.stem + ".mask.png"), compress_level=1)


def object_crop(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The square crop around ``mask``'s box grown by :data:`CROP_CONTEXT` (clamped to the image), and the
    mask cropped alike: ``((h, w, 3) uint8, (h, w) bool)``."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    side = max(y1 - y0, x1 - x0) * (1 + 2 * CROP_CONTEXT)
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    top, left = max(int(math.floor(cy - side / 2)), 0), max(int(math.floor(cx - side / 2)), 0)
    bottom, right = min(int(math.ceil(cy + side / 2)), mask.shape[0]), min(int(math.ceil(cx + side / 2)), mask.shape[1])
    return image[top:bottom, left:right], mask[top:bottom, left:right]


def _decode(data: bytes, r: ReviewedImage) -> np.ndarray:
    from slip.errors import SlipError
    from slip.images import load_image

    try:
        rgb = load_image(data)
    except SlipError as e:
        raise DatasetError(f"reviewed image {r.name}: {e}") from e
    if rgb.shape[:2] != (r.height, r.width):
        raise DatasetError(f"reviewed image {r.name} is {rgb.shape[1]}x{rgb.shape[0]} but the review says "
                           f"{r.width}x{r.height}: the export does not belong to these images")
    return rgb


def _put(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _coded(rle: dict) -> dict:
    counts = rle["counts"]
    return {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def read_labels(root: Path) -> Labels:
    """A labels folder written by :func:`write_labels`; DatasetError naming the file when it is not one."""
    root = Path(root)
    path = root / REVIEW_FILE
    try:
        review = json.loads(path.read_text())
        if review.get("format") != REVIEW_FORMAT:
            raise ValueError(f"format is {review.get('format')!r}, not {REVIEW_FORMAT!r}")
        return Labels(root, tuple(review["prompts"]), review, tuple(review["items"]))
    except OSError as e:
        raise DatasetError(f"{root} is not a reviewed-labels folder ({path}: {e.strerror or e}): "
                           f"write one with `slip labels import`") from e
    except (ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"{path} is malformed ({e}): write it again with `slip labels import`") from e


def rle_of(mask: np.ndarray) -> dict:
    """``(H, W) bool`` -> COCO RLE with ``counts`` as str."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


# --- a ranker on the reviewed images -------------------------------------------------------------------


@dataclass(frozen=True)
class ReviewedScore:
    """What a ranker does on reviewed images: object-level accuracy and the calibration probes."""

    images: int  # reviewed images scored (those with kept proposals)
    queries: int  # prompts of objects present in them
    correct: int  # of those, answered with the object (argmax segment IoU > 0.5 with the corrected mask)
    probes: tuple  # slip.calibrate.Probe per (image, prompt), present and absent

    @property
    def accuracy(self) -> float:
        return self.correct / self.queries if self.queries else float("nan")


def score_reviewed(ranker, labels: Labels, *, split: str = "heldout", crop=None) -> ReviewedScore:
    """Rank the job's proposals of each reviewed image of ``split`` with ``ranker`` (a loaded
    :class:`slip.rankers.base.Ranker`) against the corrected masks. Images without kept proposals (an
    import from a folder, not a job) are skipped; DatasetError when none is left."""
    import torch

    from slip.calibrate import Probe
    from slip.crops import CropConfig, crop_segments
    from slip.outputs import maskset_from_records

    crop = crop or CropConfig()
    items = [i for i in labels.split(split) if i.get("proposals")]
    if not items:
        raise DatasetError(f"{labels.root}: no reviewed image of split {split!r} has the job's proposals "
                           f"(import with --job to keep them)")
    with torch.no_grad():
        text = ranker.encode_texts(list(labels.prompts)).float()
    probes, queries, correct = [], 0, 0
    for item in items:
        segments = maskset_from_records(labels.proposals(item), item["height"], item["width"])
        truth = labels.truth(item)
        if len(segments):
            with torch.no_grad():
                emb = ranker.encode_images(crop_segments(labels.image(item), segments, crop, ranker.image_size)).float()
            sim = (emb @ text.to(emb.device).T).cpu().numpy()
            masks = segments.masks.cpu().numpy()
        for c, prompt in enumerate(labels.prompts):
            true = truth[prompt]
            present = bool(true.any())
            if not len(segments):
                probes.append(Probe(present, None, False))
                queries += present
                continue
            best = int(np.argmax(sim[:, c]))
            union = int((masks[best] | true).sum())
            hit = present and union > 0 and (masks[best] & true).sum() / union > 0.5
            probes.append(Probe(present, float(sim[best, c]), bool(hit)))
            queries += present
            correct += bool(hit)
    return ReviewedScore(len(items), queries, correct, tuple(probes))


# --- calibration on the reviewed images (slip review) ------------------------------------------------------


def calibrate_reviewed(labels: str | Path, spec: str, *, split: str = "train", heldout_split: str = "heldout",
                       device: str = "auto", cache_dir: Path | None = None):
    """Pick ``spec``'s threshold on the reviewed images of a labels folder (:mod:`slip.review`): every
    prompt of every image of ``split`` is a probe (present when the reviewer kept an object of it, hit when
    its best segment among the job's proposals is that object); report it on ``heldout_split`` (when that
    split has images, else on ``split`` itself)."""
    from slip.calibrate import (Calibration, best_threshold, calibration_record, operating_point,
                                ranker_directory)
    from slip.rankers.loading import load_ranker_bundle

    folder = read_labels(Path(labels))
    bundle = load_ranker_bundle(spec, device=device, cache_dir=cache_dir)
    fit = score_reviewed(bundle.ranker, folder, split=split)
    point = best_threshold(fit.probes)
    test_split = heldout_split if folder.split(heldout_split) else split
    test = fit if test_split == split else score_reviewed(bundle.ranker, folder, split=test_split)
    held = operating_point(test.probes, point.threshold)
    setting = {"reviewed_labels": str(folder.root), "split": split, "images": fit.images,
               "source": folder.review.get("source"), "job": folder.review.get("job")}
    record = calibration_record(point, held, setting=setting, heldout={"split": test_split, "images": test.images},
                                ranker=spec, ranker_sha256=bundle.ref.sha256)
    return Calibration(spec, ranker_directory(spec, cache_dir), point, held, record)
