"""The paper's evaluation images: 2x2 composites of held-out images of 4 distinct random classes.

Composite ``i`` of a :class:`CompositeSource` depends only on ``(seed, i)`` and the held-out records,
so any worker can rebuild any composite from the dataset path, the split seed and the index. The 4
classes are drawn uniformly, or with ``weights`` (per class name, 1.0 for a class not named) drawn in
turn without replacement with probabilities proportional to the remaining classes' weights: a
long-tailed job, where a class of weight 0.1 is rare.

Which images are held out (:func:`heldout_records`): ``"val"``, the validation part of the training
split (they chose the checkpoint, so they are not a clean test set), or ``"all"``, every image of a
dataset that training never saw (for synthetic data: a dataset generated with another seed). The
honest evaluation uses ``"all"`` on such a separate dataset.

Oracle proposals (:func:`oracle_segments`) are the known segments of a composite: per tile the object
(its ground-truth mask for synthetic data, the whole tile otherwise) plus distractors — an irregular
background blob and a partial object (25-45 % of it) — so a ranker is tested on picking the right segment
among plausible wrong ones, without SAM in the loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from slip.data.folder import ImageRecord, LabelledFolder, load_mask, load_rgb, split_records
from slip.errors import ConfigError, DatasetError

TILES = 4  # a 2x2 grid: tile k sits at row k // 2, column k % 2
KINDS = ("object", "background", "partial")  # oracle segment kinds
SPLITS = ("val", "all")  # heldout_records: the training split's validation images | every image
PARTIAL_FRACTION = (0.25, 0.45)  # a partial object keeps this share of the object's pixels (IoU < 0.5)


def heldout_records(folder: LabelledFolder, split: str = "val", *, val_fraction: float = 0.2,
                    split_seed: int = 0) -> tuple[ImageRecord, ...]:
    """The images composites are drawn from: ``"val"`` = the validation part of
    :func:`~slip.data.folder.split_records` (as training split them), ``"all"`` = every image."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split == "all":
        return folder.records
    return split_records(folder.records, val_fraction=val_fraction, seed=split_seed)[1]


@dataclass(frozen=True)
class Composite:
    """One evaluation image."""

    index: int  # position in the seeded sequence of its CompositeSource
    image: np.ndarray  # (2T, 2T, 3) uint8; tile k at row k // 2, column k % 2
    labels: tuple[int, ...]  # class label of each tile (4 distinct)
    class_names: tuple[str, ...]  # display name of each tile's class
    prompts: tuple[str, ...]  # caption (query text) of each tile's class
    tile_boxes: np.ndarray  # (4, 4) int64 half-open XYXY pixel box of each tile
    object_masks: np.ndarray | None  # (4, 2T, 2T) bool object mask per tile (synthetic data), else None
    sources: tuple[str, ...]  # each tile's source image, relative to the dataset root

    @property
    def tile_size(self) -> int:
        return int(self.image.shape[0] // 2)

    def tile_mask(self, k: int) -> np.ndarray:
        """``(2T, 2T) bool``, True inside tile ``k``."""
        x0, y0, x1, y1 = self.tile_boxes[k]
        out = np.zeros(self.image.shape[:2], bool)
        out[y0:y1, x0:x1] = True
        return out


class CompositeSource:
    """Seeded composites over held-out records (``val``) of a :class:`LabelledFolder`; ``weights``:
    ``{class name: weight >= 0}`` of the classes' draw (module docstring), None = uniform."""

    def __init__(self, folder: LabelledFolder, records: Sequence[ImageRecord], *, seed: int = 0,
                 tile_size: int = 128, weights: Mapping[str, float] | None = None) -> None:
        self.folder = folder
        self.seed = seed
        self.tile_size = tile_size  # side in pixels of each tile
        self.by_label: dict[int, list[ImageRecord]] = {}
        for r in records:
            self.by_label.setdefault(r.label, []).append(r)
        self.labels = sorted(self.by_label)
        if len(self.labels) < TILES:
            raise DatasetError(f"composites need held-out images of at least {TILES} classes, "
                               f"{folder.root} has {len(self.labels)}")
        self.p = None if weights is None else _draw_probabilities(weights, [folder.class_names[c] for c in self.labels])

    def __getitem__(self, index: int) -> Composite:
        rng = np.random.default_rng([self.seed, index])
        labels = [int(x) for x in rng.choice(self.labels, size=TILES, replace=False, p=self.p)]
        chosen = [self.by_label[c][int(rng.integers(len(self.by_label[c])))] for c in labels]
        return self._assemble(index, labels, chosen)

    def take(self, count: int, start: int = 0) -> list[Composite]:
        """Composites ``start .. start + count - 1``."""
        return [self[i] for i in range(start, start + count)]

    def _assemble(self, index: int, labels: list[int], records: list[ImageRecord]) -> Composite:
        t = self.tile_size
        image = np.zeros((2 * t, 2 * t, 3), np.uint8)
        with_masks = all(r.mask_path is not None for r in records)
        masks = np.zeros((TILES, 2 * t, 2 * t), bool) if with_masks else None
        boxes = np.zeros((TILES, 4), np.int64)
        for k, record in enumerate(records):
            y0, x0 = (k // 2) * t, (k % 2) * t
            boxes[k] = (x0, y0, x0 + t, y0 + t)
            rgb = load_rgb(record.path)
            image[y0 : y0 + t, x0 : x0 + t] = np.asarray(Image.fromarray(rgb).resize((t, t), Image.BILINEAR))
            if masks is not None:
                mask = Image.fromarray(load_mask(record.mask_path, rgb.shape[:2]).astype(np.uint8) * 255)
                masks[k, y0 : y0 + t, x0 : x0 + t] = np.asarray(mask.resize((t, t), Image.NEAREST)) >= 128
        root = self.folder.root
        return Composite(
            index=index,
            image=image,
            labels=tuple(labels),
            class_names=tuple(self.folder.class_names[c] for c in labels),
            prompts=tuple(self.folder.captions[c] for c in labels),
            tile_boxes=boxes,
            object_masks=masks,
            sources=tuple(str(Path(r.path).relative_to(root)) for r in records),
        )


def _draw_probabilities(weights: Mapping[str, float], names: Sequence[str]) -> np.ndarray:
    """Per held-out class (``names``, in label order) its share of the weights; ConfigError for a weight
    naming no held-out class, a negative or non-finite weight, or fewer than 4 classes of weight > 0."""
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ConfigError(f"class weights name {', '.join(unknown)}: not classes of the held-out images "
                          f"({', '.join(names)})")
    w = np.array([float(weights.get(n, 1.0)) for n in names])
    if not np.all(np.isfinite(w)) or (w < 0).any():
        raise ConfigError(f"class weights must be finite and >= 0, got {dict(weights)}")
    if (w > 0).sum() < TILES:
        raise ConfigError(f"class weights leave {(w > 0).sum()} classes of weight > 0: a composite needs {TILES}")
    return w / w.sum()


# --- oracle proposals ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OracleSegments:
    """The known segments of a composite, in a seeded shuffled order."""

    masks: np.ndarray  # (N, 2T, 2T) bool
    kinds: tuple[str, ...]  # one of KINDS per segment
    tiles: tuple[int, ...]  # the tile each segment comes from


def oracle_segments(composite: Composite, *, seed: int = 0, distractors: bool = True) -> OracleSegments:
    """Per tile: the object, and with ``distractors`` a background patch and a partial object.

    Objects are the ground-truth masks (synthetic data) or whole tiles. The order is shuffled (seeded
    by ``(seed, composite.index)``) so a ranker that scores every segment alike picks a random one.
    """
    rng = np.random.default_rng([seed, composite.index, 7])
    masks, kinds, tiles = [], [], []
    for k in range(TILES):
        obj = composite.object_masks[k] if composite.object_masks is not None else composite.tile_mask(k)
        if not obj.any():  # an empty ground-truth mask: fall back to the tile
            obj = composite.tile_mask(k)
        parts = [("object", obj)]
        if distractors:
            parts += [("background", _background_patch(composite, k, obj, rng)), ("partial", _half(obj, rng))]
        for kind, mask in parts:
            if mask.any():
                masks.append(mask), kinds.append(kind), tiles.append(k)
    order = rng.permutation(len(masks))
    return OracleSegments(
        masks=np.stack([masks[i] for i in order]),
        kinds=tuple(kinds[i] for i in order),
        tiles=tuple(tiles[i] for i in order),
    )


def _background_patch(composite: Composite, k: int, obj: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An irregular blob of tile ``k`` (30-60 % of it, like a SAM background segment), minus the object
    when the object is not the whole tile. Not a rectangle: a square patch would look like a square."""
    x0, y0, x1, y1 = composite.tile_boxes[k]
    t = int(x1 - x0)
    low = (rng.uniform(size=(4, 4)) * 255).astype(np.uint8)
    field = np.asarray(Image.fromarray(low).resize((t, t), Image.BICUBIC), np.float32)
    blob = field >= np.quantile(field, 1.0 - rng.uniform(0.3, 0.6))
    patch = np.zeros_like(obj)
    patch[y0:y1, x0:x1] = blob
    whole_tile = obj.sum() >= t * t
    return patch if whole_tile else patch & ~obj


def _half(obj: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The part of ``obj`` beyond a straight cut at a random angle, keeping a ``PARTIAL_FRACTION`` share of
    its pixels: IoU with the object < 0.5, so choosing it is never counted as finding the object."""
    ys, xs = np.nonzero(obj)
    angle = rng.uniform(0, 2 * math.pi)
    along = xs * math.cos(angle) + ys * math.sin(angle)
    keep = int(len(along) * rng.uniform(*PARTIAL_FRACTION))
    side = np.argsort(-along, kind="stable")[: max(keep, 1)]
    out = np.zeros_like(obj)
    out[ys[side], xs[side]] = True
    return out
