"""Instance-mask training data for SAM: sources, multi-object scenes and prompts.

A scene is one image with its visible-instance masks in SAM's square input frame (the image resized so
its longer side is ``size``, padded at the bottom/right, as ``Sam.preprocess`` pads):
``image (size, size, 3) uint8``, ``masks (K, size, size) bool``, ``valid (h, w)`` the unpadded region.

Sources (an :class:`InstanceBank`: images with their instance masks, held in memory):

* a mask folder (:mod:`slip.data.folder` layout; ``slip data synth`` writes one): one object per image;
* a COCO annotation file (polygons or RLE, decoded by pycocotools) and its image directory: every
  non-crowd annotation is an instance.

Scenes (:func:`build_scene`) start from a base, either a 2x2 composite of four bank images or one bank
image, and get cut-out objects of other bank images pasted on top at random places and scales, so objects
touch, overlap and occlude; each mask is the visible part of its object. Prompts (:func:`sample_prompts`)
come from the ground truth as SAM samples them: a point inside an instance, or its box with jitter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from slip.data.folder import ImageRecord, load_mask, load_rgb
from slip.errors import DatasetError


@dataclass(frozen=True)
class InstanceImage:
    """An image with one mask per object instance."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    masks: np.ndarray  # (K, H, W) bool visible-instance masks, K >= 0
    valid: tuple[int, int]  # (h, w) region holding image content (the rest is padding)


@dataclass(frozen=True)
class SceneConfig:
    """How training scenes are assembled from a bank."""

    size: int = 256  # scene side in pixels (the model's img_size)
    composite_prob: float = 0.5  # chance the base is a 2x2 composite of 4 bank images (else one image)
    max_pastes: int = 3  # cut-out objects pasted on the base, uniform in 0..max_pastes
    paste_scale: tuple[float, float] = (0.15, 0.45)  # pasted object's longer side / scene side
    near_prob: float = 0.0  # chance a paste lands on an earlier object's box (touching / occluding it)
    min_area: int = 24  # pixels; instances with less visible area are dropped


PLAIN_SCENES = SceneConfig(composite_prob=0.0, max_pastes=0)  # the bank images as they are (COCO data)


@dataclass(frozen=True)
class PromptConfig:
    """How prompts are sampled from the ground truth."""

    point_fraction: float = 0.75  # share of object prompts that are single points (else boxes)
    background_fraction: float = 0.0  # share of prompts that are points off every object (target: empty)
    box_jitter: float = 0.1  # std of box-corner noise / box side (SAM: 0.1, at most 20 px per 1024 px)


@dataclass(frozen=True)
class Prompt:
    """One prompt in scene pixels (integer pixel indices, as SAM's encoders expect)."""

    kind: str  # "point" (one positive point, multimask output) or "box" (XYXY, single output)
    coords: tuple[float, ...]  # (x, y) for a point, (x0, y0, x1, y1) inclusive for a box
    target: int  # index of the instance it selects; -1 = background (the target is an empty mask)


# --- banks -----------------------------------------------------------------------------------------------


class InstanceBank:
    """Images with instance masks, decoded once and held in memory."""

    def __init__(self, items: Sequence[InstanceImage], *, name: str) -> None:
        if not items:
            raise DatasetError(f"{name} holds no images with instance masks")
        self.items = list(items)
        self.name = name  # where the data came from, for messages

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> InstanceImage:
        return self.items[index]

    @property
    def instances(self) -> int:
        return sum(len(item.masks) for item in self.items)


def folder_bank(records: Sequence[ImageRecord], *, name: str) -> InstanceBank:
    """A bank of mask-folder images (one object each); every record needs a ``.mask.png``."""
    items = []
    for record in records:
        if record.mask_path is None:
            raise DatasetError(
                f"{record.path} has no ground-truth mask {record.path.stem}.mask.png: SAM training needs "
                "instance masks (generate a dataset with `slip data synth`, or pass --coco ANN.json)"
            )
        image = load_rgb(record.path)
        mask = load_mask(record.mask_path, image.shape[:2])
        items.append(InstanceImage(image, mask[None], image.shape[:2]))
    return InstanceBank(items, name=name)


def coco_bank(annotations: Path, image_dir: Path, *, image_ids: Sequence[int] | None = None) -> InstanceBank:
    """A bank from a COCO instances file (polygons or RLE); crowd annotations are skipped."""
    coco = open_coco(annotations)
    ids = coco_image_ids(coco) if image_ids is None else list(image_ids)
    items = []
    for image_id in ids:
        info = coco.imgs[image_id]
        image = load_rgb(Path(image_dir) / info["file_name"])
        if image.shape[:2] != (info["height"], info["width"]):
            raise DatasetError(
                f"{info['file_name']} is {image.shape[1]}x{image.shape[0]} but {annotations} says "
                f"{info['width']}x{info['height']}"
            )
        anns = [a for a in coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        masks = np.stack([coco.annToMask(a).astype(bool) for a in anns])
        items.append(InstanceImage(image, masks, image.shape[:2]))
    return InstanceBank(items, name=str(annotations))


def open_coco(annotations: Path):
    """A ``pycocotools.coco.COCO`` index of ``annotations``; DatasetError when unreadable."""
    from pycocotools.coco import COCO

    if not Path(annotations).is_file():
        raise DatasetError(f"COCO annotation file {annotations} does not exist")
    try:
        return COCO(str(annotations))
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise DatasetError(f"{annotations} is not a COCO instances file: {e}") from e


def coco_image_ids(coco) -> list[int]:
    """Sorted ids of the images with at least one non-crowd annotation."""
    return sorted(i for i, anns in coco.imgToAnns.items() if any(not a.get("iscrowd", 0) for a in anns))


# --- scenes ----------------------------------------------------------------------------------------------


def letterbox(item: InstanceImage, size: int) -> InstanceImage:
    """Resize so the longer side is ``size`` (SAM's ResizeLongestSide) and pad to ``size x size``."""
    h, w = item.image.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(int(h * scale + 0.5), 1), max(int(w * scale + 0.5), 1)
    image = np.zeros((size, size, 3), np.uint8)
    image[:nh, :nw] = _resize(item.image, nw, nh)
    masks = np.zeros((len(item.masks), size, size), bool)
    for k, mask in enumerate(item.masks):
        masks[k, :nh, :nw] = _resize_mask(mask, nw, nh)
    return InstanceImage(image, masks, (nh, nw))


def build_scene(bank: InstanceBank, rng: np.random.Generator, config: SceneConfig) -> InstanceImage:
    """A random training scene (module docstring); masks smaller than ``min_area`` are dropped."""
    s = config.size
    # 1. the base: a 2x2 composite or one image
    if rng.uniform() < config.composite_prob:
        scene = _composite([bank[int(i)] for i in rng.integers(len(bank), size=4)], s)
    else:
        scene = letterbox(bank[int(rng.integers(len(bank)))], s)
    image, masks = scene.image.copy(), list(scene.masks)
    # 2. cut-out objects pasted on top; earlier masks lose what a paste covers
    for _ in range(int(rng.integers(0, config.max_pastes + 1))):
        near = None
        if masks and config.near_prob and rng.uniform() < config.near_prob:
            near = masks[int(rng.integers(len(masks)))]
        placed = _paste(image, bank[int(rng.integers(len(bank)))], rng, config, scene.valid, near)
        if placed is not None:
            masks = [m & ~placed for m in masks] + [placed]
    kept = [m for m in masks if m.sum() >= config.min_area]
    stacked = np.stack(kept) if kept else np.zeros((0, s, s), bool)
    return InstanceImage(image, stacked, scene.valid)


def _composite(items: Sequence[InstanceImage], size: int) -> InstanceImage:
    """Four images letterboxed into the tiles of a 2x2 grid (tile k at row k // 2, column k % 2)."""
    t = size // 2
    image = np.zeros((size, size, 3), np.uint8)
    masks = []
    for k, item in enumerate(items):
        tile = letterbox(item, t)
        y0, x0 = (k // 2) * t, (k % 2) * t
        image[y0 : y0 + t, x0 : x0 + t] = tile.image
        for mask in tile.masks:
            full = np.zeros((size, size), bool)
            full[y0 : y0 + t, x0 : x0 + t] = mask
            masks.append(full)
    return InstanceImage(image, np.stack(masks) if masks else np.zeros((0, size, size), bool), (2 * t, 2 * t))


def _paste(image: np.ndarray, item: InstanceImage, rng: np.random.Generator, config: SceneConfig,
           valid: tuple[int, int], near: np.ndarray | None = None) -> np.ndarray | None:
    """Alpha-blend one random instance of ``item`` into ``image`` (in place); its ``(S, S)`` mask.
    With ``near`` (a mask), the paste's centre falls inside that mask's box."""
    if not len(item.masks):
        return None
    mask = item.masks[int(rng.integers(len(item.masks)))]
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return None
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    scale = rng.uniform(*config.paste_scale) * config.size / max(y1 - y0, x1 - x0)
    w, h = max(int((x1 - x0) * scale), 2), max(int((y1 - y0) * scale), 2)
    if w > valid[1] or h > valid[0]:
        return None
    rgb = _resize(item.image[y0:y1, x0:x1], w, h).astype(np.float32)
    alpha = np.asarray(Image.fromarray(mask[y0:y1, x0:x1].astype(np.float32)).resize((w, h), Image.BILINEAR))
    alpha = alpha.clip(0, 1)[..., None]
    x, y = int(rng.integers(0, valid[1] - w + 1)), int(rng.integers(0, valid[0] - h + 1))
    if near is not None and near.any():
        ny, nx = np.nonzero(near)
        x = int(np.clip(rng.integers(nx.min(), nx.max() + 1) - w // 2, 0, valid[1] - w))
        y = int(np.clip(rng.integers(ny.min(), ny.max() + 1) - h // 2, 0, valid[0] - h))
    region = image[y : y + h, x : x + w].astype(np.float32)
    image[y : y + h, x : x + w] = (region * (1 - alpha) + rgb * alpha + 0.5).astype(np.uint8)
    placed = np.zeros(image.shape[:2], bool)
    placed[y : y + h, x : x + w] = alpha[..., 0] >= 0.5
    return placed


def _resize(rgb: np.ndarray, w: int, h: int) -> np.ndarray:
    if rgb.shape[:2] == (h, w):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))


def _resize_mask(mask: np.ndarray, w: int, h: int) -> np.ndarray:
    if mask.shape == (h, w):
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.BILINEAR)) >= 128


# --- prompts ---------------------------------------------------------------------------------------------


def sample_prompts(scene: InstanceImage, count: int, rng: np.random.Generator, config: PromptConfig) -> list[Prompt]:
    """``count`` prompts from the scene's ground truth; instances are visited in a random cycle so
    every object gets prompts before any gets a second one."""
    k = len(scene.masks)
    order = rng.permutation(k) if k else np.zeros(0, np.int64)
    background = _background_pixels(scene) if config.background_fraction > 0 else None
    prompts = []
    for i in range(count):
        if background is not None and len(background[0]) and (not k or rng.uniform() < config.background_fraction):
            j = int(rng.integers(len(background[0])))
            prompts.append(Prompt("point", (float(background[1][j]), float(background[0][j])), -1))
        elif k:
            target = int(order[i % k])
            mask = scene.masks[target]
            kind = "point" if rng.uniform() < config.point_fraction else "box"
            prompts.append(Prompt(kind, _point_in(mask, rng) if kind == "point" else _jittered_box(mask, rng, config), target))
    return prompts


def _background_pixels(scene: InstanceImage) -> tuple[np.ndarray, np.ndarray]:
    free = np.zeros(scene.image.shape[:2], bool)
    free[: scene.valid[0], : scene.valid[1]] = True
    if len(scene.masks):
        free &= ~scene.masks.any(0)
    return np.nonzero(free)


def _point_in(mask: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    j = int(rng.integers(len(ys)))
    return float(xs[j]), float(ys[j])


def _jittered_box(mask: np.ndarray, rng: np.random.Generator, config: PromptConfig) -> tuple[float, ...]:
    ys, xs = np.nonzero(mask)
    box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float64)
    side = np.array([box[2] - box[0], box[3] - box[1]] * 2) + 1
    limit = 20.0 * mask.shape[0] / 1024  # SAM: at most 20 px in a 1024 px frame
    noise = np.clip(rng.normal(0.0, config.box_jitter * side), -limit, limit) if config.box_jitter > 0 else 0.0
    box = box + noise
    h, w = mask.shape
    x0, x1 = sorted(np.clip(box[[0, 2]], 0, w - 1))
    y0, y1 = sorted(np.clip(box[[1, 3]], 0, h - 1))
    return float(x0), float(y0), float(x1), float(y1)
