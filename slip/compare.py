"""``slip compare``: which engine to run, measured on the user's own labelled images.

Each candidate is a named SPEC (``--config NAME=SPEC``), a comma list of ``key=value``::

    sam=vit_b,clip=openai/clip-vit-base-patch32       engine=sam3,sam=facebook/sam3
    engine=sam3-rank,sam=sam3,propose=animal,clip=google/siglip2-base-patch16-224,threshold=0.2

Keys (:data:`SPEC_KEYS`): the model settings ``engine``, ``sam``, ``clip``, ``dtype``; the request options
``propose``, ``threshold``, ``instances``, ``filters``, ``points_per_side``, ``pred_iou_thresh``,
``stability_score_thresh``. Ground truth is a COCO instances file (``slip data synth --coco`` writes one; an
image is the truth's whose ``file_name`` ends its path, however the tool wrote it:
:func:`slip.inputs.match_files`); its category names are the prompts. A truth of boxes only
(a detection dataset: some annotation has a ``bbox`` and no segmentation) is scored on boxes: each answer by its
mask's bounding box, COCO ``bbox`` AP, box IoU for the matches.

Per configuration (:class:`ConfigScore`):

* **AP, AP50** — pycocotools ``COCOeval`` (segm; bbox for a truth of boxes) over each prompt's top
  :data:`DETECTIONS_PER_PROMPT` candidate segments, scored by the engine's score for that prompt;
* **presence-aware F1** — the engine's own answers (its threshold, ``instances``) against the truth, every
  prompt on every image: an answer for a category the image lacks is a false positive, a missed object a false
  negative (mask IoU >= 0.5 matches, box IoU for a truth of boxes); plus the share of (image, prompt) pairs
  whose "here / not here" is right;
* **seconds per image** p50 / p90 on this machine (after one untimed warm-up image), and the projected wall
  time of ``job_size`` images on ``workers`` such workers.

Every SPEC, every model spec and the truth file are checked before any model loads: one line per problem.
:func:`write_report` writes ``compare.json`` and ``index.html`` (:mod:`slip.compare_page`).
"""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils

from slip.data.coco_truth import box_mask, group_categories, truth_shape
from slip.errors import ConfigError, DatasetError
from slip.inputs import match_files

SPEC_KEYS = {  # key -> where it goes
    "engine": "models", "sam": "models", "clip": "models", "dtype": "models",
    "propose": "options", "threshold": "options", "instances": "options", "filters": "options",
    "points_per_side": "options", "pred_iou_thresh": "options", "stability_score_thresh": "options",
}
DETECTIONS_PER_PROMPT = 20  # candidates per prompt and image submitted to COCOeval
MATCH_IOU = 0.5  # an answer matches a true object at this IoU (of masks, or of boxes for a truth of boxes)


@dataclass(frozen=True)
class Candidate:
    """One configuration to compare."""

    name: str  # as given: NAME of --config NAME=SPEC
    spec: str  # SPEC as given
    models: dict  # ModelSettings fields (engine, sam, clip, dtype)
    options: dict  # SegmentOptions fields (sam3-rank's concept: propose)


@dataclass
class ConfigScore:
    """What one configuration achieved."""

    name: str
    spec: str
    ap: float | None  # COCO AP @ IoU .50:.95 (segm; bbox for a truth of boxes)
    ap50: float | None  # COCO AP @ IoU .50
    f1: float  # presence-aware F1 of the answers
    precision: float
    recall: float
    presence_accuracy: float  # share of (image, prompt) pairs answered "here" exactly when an object is
    seconds_p50: float
    seconds_p90: float
    projected_hours: float  # job_size images on `workers` workers at seconds_p50
    images: int
    counts: dict = field(default_factory=dict)  # tp, fp, fn, pairs
    request: dict = field(default_factory=dict)  # the resolved request (models named by digest)


# --- configurations -------------------------------------------------------------------------------------------


def parse_config(text: str) -> Candidate:
    """``NAME=SPEC`` -> a :class:`Candidate`; ConfigError naming the problem."""
    name, sep, spec = text.partition("=")
    if not sep or not name.strip() or not spec.strip():
        raise ConfigError(f"--config {text!r}: expected NAME=SPEC, e.g. slip=sam=vit_b,clip=openai/clip-vit-base-patch32")
    models: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise ConfigError(f"--config {name}: {item!r} is not key=value (SPEC is a comma list such as "
                              f"engine=sam3,sam=facebook/sam3)")
        where = SPEC_KEYS.get(key)
        if where is None:
            raise ConfigError(f"--config {name}: unknown key {key!r}; use {', '.join(SPEC_KEYS)}")
        if where == "models":
            models[key] = value
        else:
            options[key] = value
    return Candidate(name.strip(), spec, models, options)


def check_candidates(candidates: Sequence[Candidate], *, device: str, cache_dir: Path | None) -> list[tuple]:
    """Validate every candidate before any model loads: ``[(candidate, ModelSettings, SegmentOptions)]``."""
    from slip.engines.build import check_engine
    from slip.options import SegmentOptions
    from slip.settings import ModelSettings

    if not candidates:
        raise ConfigError("no --config given: name at least one candidate, e.g. --config slip=sam=vit_b")
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise ConfigError(f"--config names must differ, got {names}")
    checked = []
    for c in candidates:
        try:
            models = ModelSettings(**{"device": device, "cache_dir": cache_dir, **c.models})
            options = SegmentOptions.parse({"instances": "all", **c.options})
            check_engine(models.engine, options)
        except ConfigError as e:
            raise ConfigError(f"--config {c.name}: {e}") from e
        checked.append((c, models, options))
    return checked


# --- ground truth ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Truth:
    """A COCO instances file restricted to the images given."""

    coco: Any  # pycocotools COCO over the selected images
    prompts: tuple[str, ...]  # category names, in category order
    category_ids: tuple[int, ...]  # COCO category id of each prompt
    images: tuple[tuple[int, Path], ...]  # (COCO image id, file) of every image evaluated
    groups: tuple[str, ...] = ()  # categories not queried: group names (see :func:`group_categories`)
    shape: str = "mask"  # what the truth outlines: "mask" (segmentations) or "box" (boxes only, see truth_shape)
    boxed: int = 0  # annotations of the selected images with a box and no segmentation

    def regions(self, image_id: int, category: int) -> list:
        """The image's true objects of ``category`` as COCO regions: RLEs, or ``[x, y, w, h]`` boxes."""
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=[image_id], catIds=[category]))
        return [self.coco.annToRLE(a) if self.shape == "mask" else a["bbox"] for a in anns]

    def outline(self, ann: dict) -> np.ndarray:
        """One annotation as an ``(H, W) bool`` mask to draw: its segmentation, or its box filled."""
        if self.shape == "mask":
            return self.coco.annToMask(ann).astype(bool)
        image = self.coco.imgs[ann["image_id"]]
        return box_mask(ann["bbox"], image["height"], image["width"])


def load_truth(path: Path, files: Sequence[Path], *, prompts: Sequence[str] | None = None,
               sample: int | None = None, seed: int = 0) -> Truth:
    """The truth for the image ``files`` (each matched to the truth image whose ``file_name`` ends its path:
    :func:`slip.inputs.match_files`); DatasetError / ConfigError in one line for an unusable file."""
    from pycocotools.coco import COCO

    data = _read_truth(path)
    categories = sorted(data["categories"], key=lambda c: c["id"])
    by_name = {c["name"]: c["id"] for c in categories}
    groups = () if prompts else group_categories(data)
    wanted = list(prompts) if prompts else [n for n in by_name if n not in groups]
    matched = [p for p in wanted if p in by_name]
    if not matched:
        raise ConfigError(f"{path}: its categories ({', '.join(list(by_name)[:8]) or 'none'}) match none of the "
                          f"prompts ({', '.join(wanted[:8]) or 'none'}): the categories are the prompts")
    images = data["images"]
    found = match_files([str(img.get("file_name", "")) for img in images],
                        [str(Path(f).absolute()) for f in files])
    pairs = [(images[i]["id"], files[j]) for i, j in sorted(found.items(), key=lambda m: m[1])]
    if not pairs:
        example = images[0].get("file_name") if images else "?"
        raise DatasetError(f"{path}: none of the {len(files)} images given is in the truth file (a file_name must "
                           f"end an image's path, e.g. {example!r})")
    if sample is not None and sample < len(pairs):
        pairs = sorted(random.Random(seed).sample(pairs, sample))
    kept = {i for i, _ in pairs}
    annotations = [a for a in data["annotations"] if a.get("image_id") in kept]
    shape, boxed = truth_shape(path, annotations)
    data = {**data, "images": [i for i in data["images"] if i["id"] in kept],
            "annotations": [{"iscrowd": 0, **a} for a in annotations]}
    coco = _quiet(COCO)
    coco.dataset = data
    _quiet(coco.createIndex)
    for ann in coco.anns.values():  # COCOeval reads every annotation's area (and bbox); exports without them exist
        if shape == "box" and "bbox" not in ann:  # a masked annotation in a box truth: its mask's box
            ann["bbox"] = [float(v) for v in mask_utils.toBbox(coco.annToRLE(ann))]
        ann.setdefault("area", float(mask_utils.area(coco.annToRLE(ann))) if shape == "mask"
                       else float(ann["bbox"][2] * ann["bbox"][3]))
    return Truth(coco, tuple(matched), tuple(by_name[p] for p in matched), tuple(pairs), groups, shape, boxed)


def _read_truth(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read the truth file {path}: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations",
                                                                                       "categories")):
        raise DatasetError(f"{path} is not a COCO instances file (it needs images, annotations and categories lists)")
    return data


# --- running and scoring --------------------------------------------------------------------------------------


def run_candidate(engine, truth: Truth, *, job_size: int, workers: int, name: str, spec: str,
                  positive_only: bool, examples: int = 0) -> tuple[ConfigScore, dict]:
    """Run one built engine over the truth's images; its score and ``examples`` example answers, images spread
    over the list (``{image id: (mask of the answer to the first true category, caption)}``)."""
    from slip.bars import progress_bar
    from slip.images import load_image

    prompts = list(truth.prompts)

    def answers():  # a bar per configuration on a terminal (a real-size candidate takes seconds an image on CPU)
        for k, (image_id, file) in enumerate(progress_bar(truth.images, desc=name, unit="image", leave=False)):
            image = load_image(file)
            if k == 0:
                engine(image, prompts)  # warm-up: lazy initialisation, caches, allocator
            start = time.perf_counter()
            result = engine(image, prompts)
            yield image_id, result, time.perf_counter() - start

    score, shown = score_answers(answers(), truth, job_size=job_size, workers=workers, name=name, spec=spec,
                                 positive_only=positive_only, examples=examples)
    score.request = engine.request.to_json()
    return score, shown


def score_answers(answers, truth: Truth, *, job_size: int, workers: int, name: str, spec: str, positive_only: bool,
                  examples: int = 0) -> tuple[ConfigScore, dict]:
    """Score ``(image id, SlipResult, seconds)`` answers (in process, or read back from a queue job's results) over
    the truth; the score (its ``request`` left empty) and the example answers."""
    detections, seconds, shown = [], [], {}
    tally = {"tp": 0, "fp": 0, "fn": 0, "pairs": 0, "presence_right": 0}
    count = len(truth.images)
    spread = {truth.images[(i * count) // examples][0] for i in range(min(examples, count))}
    for image_id, result, took in answers:
        seconds.append(took)
        detections += _detections(result, image_id, truth, positive_only)
        _tally(result, truth, image_id, tally)
        if image_id in spread:
            shown[image_id] = _example(result, truth, image_id)
    ap, ap50 = _coco_ap(truth, detections)
    tp, fp, fn = tally["tp"], tally["fp"], tally["fn"]
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    p50 = statistics.median(seconds)
    p90 = float(np.quantile(seconds, 0.9))
    score = ConfigScore(
        name=name, spec=spec, ap=ap, ap50=ap50, f1=2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
        precision=precision, recall=recall, presence_accuracy=tally["presence_right"] / max(tally["pairs"], 1),
        seconds_p50=p50, seconds_p90=p90, projected_hours=job_size * p50 / workers / 3600, images=len(seconds),
        counts={k: v for k, v in tally.items()},
    )
    return score, shown


def _detections(result, image_id: int, truth: Truth, positive_only: bool) -> list[dict]:
    """Each prompt's top candidates as COCO results (RLE, or the mask's box for a truth of boxes; score)."""
    key = "segmentation" if truth.shape == "mask" else "bbox"
    out = []
    for p, category in enumerate(truth.category_ids):
        column = result.similarity[:, p]
        order = torch.argsort(column, descending=True, stable=True)[:DETECTIONS_PER_PROMPT].tolist()
        chosen = [i for i in order if not positive_only or column[i] > 0]
        for i, region in zip(chosen, _regions(result, chosen, truth.shape)):
            out.append({"image_id": image_id, "category_id": category, key: region, "score": float(column[i])})
    return out


def _regions(result, indices: Sequence[int], shape: str) -> list:
    """Segments ``indices`` of a result as COCO regions: RLEs, or ``[x, y, w, h]`` boxes (``shape`` "box")."""
    from slip.outputs import encode_rle

    rles = encode_rle(result.proposals.segments.masks[list(indices)]) if len(indices) else []
    return rles if shape == "mask" else [[float(v) for v in mask_utils.toBbox(r)] for r in rles]


def _tally(result, truth: Truth, image_id: int, tally: dict) -> None:
    """Add one image's presence-aware counts: every prompt's answers against its true objects."""
    for match, category in zip(result.matches, truth.category_ids):
        true = truth.regions(image_id, category)
        answers = _regions(result, [i for i, _ in match.instances], truth.shape)
        hits = _greedy_matches(mask_utils.iou(answers, true, [0] * len(true)) if answers and true else None)
        tally["tp"] += hits
        tally["fp"] += len(answers) - hits
        tally["fn"] += len(true) - hits
        tally["pairs"] += 1
        tally["presence_right"] += int(bool(answers) == bool(true))


def _greedy_matches(ious: np.ndarray | None) -> int:
    """Answers (rows, best first) matched one-to-one to true objects (columns) at IoU >= MATCH_IOU."""
    if ious is None:
        return 0
    free, hits = set(range(ious.shape[1])), 0
    for row in np.asarray(ious):
        best = max(sorted(free), key=lambda j: row[j], default=None)
        if best is not None and row[best] >= MATCH_IOU:
            free.remove(best)
            hits += 1
    return hits


def _coco_ap(truth: Truth, detections: list[dict]) -> tuple[float, float]:
    """COCO AP and AP50 (segm; bbox for a truth of boxes) over the truth's images and prompts (0 without any
    detection)."""
    from pycocotools.cocoeval import COCOeval

    if not detections:
        return 0.0, 0.0
    results = _quiet(truth.coco.loadRes, detections)
    evaluator = COCOeval(truth.coco, results, "segm" if truth.shape == "mask" else "bbox")
    evaluator.params.imgIds = [i for i, _ in truth.images]
    evaluator.params.catIds = list(truth.category_ids)
    for step in (evaluator.evaluate, evaluator.accumulate, evaluator.summarize):
        _quiet(step)
    return max(float(evaluator.stats[0]), 0.0), max(float(evaluator.stats[1]), 0.0)


def _example(result, truth: Truth, image_id: int) -> tuple[np.ndarray, str]:
    """The answer to the image's first true category (its union mask) and a caption."""
    from slip.outputs import caption, chosen_mask

    anns = truth.coco.loadAnns(truth.coco.getAnnIds(imgIds=[image_id]))
    category = anns[0]["category_id"] if anns else truth.category_ids[0]
    match = result.matches[truth.category_ids.index(category)] if category in truth.category_ids else result.matches[0]
    return chosen_mask(result.proposals.segments.masks, match, result.image_size), caption(match)


def _quiet(fn, *args):
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def score_record(score: ConfigScore) -> dict:
    return asdict(score)


def run_comparison(checked: Sequence[tuple], truth: Truth, *, job_size: int, workers: int,
                   examples: int = 4, log=print) -> tuple[list[ConfigScore], dict]:
    """Build and run each checked candidate in turn (one engine in memory at a time); the scores and the
    example answers ``{config name: {image id: (mask, caption)}}``."""
    import gc

    from slip.engines.build import build_engine

    scores, shown = [], {}
    for candidate, models, options in checked:
        start = time.perf_counter()
        engine = build_engine(models, options)
        load_s = time.perf_counter() - start
        score, answers = run_candidate(engine, truth, job_size=job_size, workers=workers, name=candidate.name,
                                       spec=candidate.spec, positive_only=models.engine == "sam3", examples=examples)
        score.counts["load_seconds"] = round(load_s, 3)
        scores.append(score)
        shown[candidate.name] = answers
        log(f"{candidate.name}: AP {score.ap:.3f}, AP50 {score.ap50:.3f}, F1 {score.f1:.3f}, "
            f"{score.seconds_p50:.2f} s/image (p90 {score.seconds_p90:.2f})")
        del engine
        gc.collect()
    return scores, shown
