"""Procedural labelled images with ground-truth object masks, offline and deterministic.

One image = one object of a named class (see :mod:`slip.data.shapes`) with a random colour, scale,
rotation and position, on a random textured background. :func:`render_scene` places several objects in
one image with an instance mask each (for SAM training).

Dataset layout written by :func:`generate_dataset` (read back by :mod:`slip.data.folder`)::

    DIR/classes.json              {"format": "slip-synth", "classes": [{"name", "dir"}], "seed", ...}
    DIR/<class dir>/<id>.png      RGB uint8, size x size
    DIR/<class dir>/<id>.mask.png L uint8, 0 = background, 255 = object
    DIR/instances.coco.json       with coco=True: COCO ground truth (see :func:`coco_ground_truth`)

Every image is seeded by ``(seed, class index in the catalogue, image index)``, so a class's images do
not depend on which other classes or how many images were asked for.
"""

from __future__ import annotations

import colorsys
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from pycocotools import mask as mask_utils

from slip.data.shapes import CATALOGUE, Palette
from slip.errors import ConfigError, DatasetError

CLASS_NAMES: tuple[str, ...] = tuple(CATALOGUE)
MASK_SUFFIX = ".mask.png"
MANIFEST = "classes.json"
COCO_FILE = "instances.coco.json"
SUPERSAMPLE = 2  # objects are drawn at this multiple of their final size, then box-filtered down
MAX_ROTATION_DEG = 30.0  # +-, small enough that square/diamond-like confusions cannot arise
SCALE_RANGE = (0.38, 0.7)  # object side as a fraction of the image side (before rotation)


def class_dir_name(name: str) -> str:
    """Directory name of a class: spaces -> underscores (``"letter A"`` -> ``"letter_A"``)."""
    return name.replace(" ", "_")


def select_classes(classes: int | Sequence[str]) -> tuple[str, ...]:
    """The first ``N`` catalogue classes, or the named ones (validated)."""
    if isinstance(classes, int):
        if not 1 <= classes <= len(CLASS_NAMES):
            raise ConfigError(f"--classes must be between 1 and {len(CLASS_NAMES)}, got {classes}")
        return CLASS_NAMES[:classes]
    unknown = [c for c in classes if c not in CATALOGUE]
    if unknown:
        raise ConfigError(f"unknown synthetic classes {unknown}; known: {', '.join(CLASS_NAMES)}")
    return tuple(classes)


# --- colours and backgrounds ---------------------------------------------------------------------------


def _rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return int(r * 255), int(g * 255), int(b * 255)


def _palette(rng: np.random.Generator) -> tuple[Palette, float]:
    """Saturated body + accent colours and the body hue."""
    hue = float(rng.uniform())
    body = _rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
    accent = _rgb(hue + rng.uniform(0.35, 0.65), rng.uniform(0.5, 1.0), rng.uniform(0.4, 0.9))
    return Palette(body=(*body, 255), accent=(*accent, 255)), hue


def _background(rng: np.random.Generator, size: int, avoid_hue: float) -> np.ndarray:
    """``(size, size, 3) float32`` texture in ``[0, 255]`` whose hue stays away from ``avoid_hue``."""
    hue = avoid_hue + rng.uniform(0.25, 0.75)
    a = np.array(_rgb(hue, rng.uniform(0.05, 0.5), rng.uniform(0.3, 0.95)), np.float32)
    b = np.array(_rgb(hue + rng.uniform(-0.08, 0.08), rng.uniform(0.05, 0.5), rng.uniform(0.2, 0.95)), np.float32)
    kind = rng.integers(5)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == 0:  # stripes at a random angle
        angle, freq = rng.uniform(0, math.pi), rng.uniform(3, 10)
        t = (np.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle))) > 0)[..., None]
    elif kind == 1:  # checkerboard
        cells = int(rng.integers(3, 10))
        t = (((xx * cells).astype(int) + (yy * cells).astype(int)) % 2 == 1)[..., None]
    elif kind == 2:  # smooth colour blobs
        cells = int(rng.integers(2, 6))
        low = (rng.uniform(size=(cells, cells, 1)) * 255).astype(np.uint8)[..., 0]
        t = np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC), np.float32)[..., None] / 255
    elif kind == 3:  # dots
        canvas = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(8, 30))):
            x, y, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(size / 60, size / 14)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
        t = np.asarray(canvas, np.float32)[..., None] / 255
    else:  # vertical gradient
        t = yy[..., None] if rng.uniform() < 0.5 else xx[..., None]
    texture = a * (1 - t) + b * t
    return texture + rng.normal(0, rng.uniform(2, 14), size=texture.shape).astype(np.float32)


# --- objects -------------------------------------------------------------------------------------------


def _draw_sprite(class_name: str, side: int, palette: Palette, angle: float) -> np.ndarray:
    """``(h, w, 4) float32`` RGBA sprite in ``[0, 255]``, rotated by ``angle`` degrees."""
    c = side * SUPERSAMPLE
    canvas = Image.new("RGBA", (c, c), (0, 0, 0, 0))
    CATALOGUE[class_name](ImageDraw.Draw(canvas), c, palette)
    canvas = canvas.rotate(angle, resample=Image.BICUBIC, expand=True)
    canvas = canvas.reduce(SUPERSAMPLE)
    return np.asarray(canvas, np.float32)


def _place(canvas: np.ndarray, sprite: np.ndarray, x: int, y: int) -> np.ndarray:
    """Alpha-blend ``sprite`` into ``canvas`` (in place) at top-left ``(x, y)``; returns its mask."""
    h, w = sprite.shape[:2]
    alpha = sprite[..., 3:] / 255.0
    region = canvas[y : y + h, x : x + w]
    region[:] = region * (1 - alpha) + sprite[..., :3] * alpha
    mask = np.zeros(canvas.shape[:2], bool)
    mask[y : y + h, x : x + w] = sprite[..., 3] >= 128
    return mask


def _sprite_for(class_name: str, rng: np.random.Generator, size: int, scale: tuple[float, float]):
    palette, hue = _palette(rng)
    side = max(int(size * rng.uniform(*scale)), 6)
    sprite = _draw_sprite(class_name, side, palette, float(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)))
    if max(sprite.shape[:2]) > size:  # rotation grew it past the image: shrink to fit
        k = size / max(sprite.shape[:2])
        img = Image.fromarray(sprite.clip(0, 255).astype(np.uint8), "RGBA")
        img = img.resize((max(int(img.width * k), 1), max(int(img.height * k), 1)), Image.BOX)
        sprite = np.asarray(img, np.float32)
    return sprite, hue


def _finish(canvas: np.ndarray) -> np.ndarray:
    return canvas.clip(0, 255).astype(np.uint8)


def render_object(class_name: str, rng: np.random.Generator, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """One object of ``class_name`` on a textured background.

    Returns ``(image, mask)``: ``(size, size, 3) uint8`` RGB and ``(size, size) bool``, True on the object.
    """
    if class_name not in CATALOGUE:
        raise ConfigError(f"unknown synthetic class {class_name!r}; known: {', '.join(CLASS_NAMES)}")
    if size < 16:
        raise ConfigError(f"synthetic images must be at least 16 px, got {size}")
    sprite, hue = _sprite_for(class_name, rng, size, SCALE_RANGE)
    canvas = _background(rng, size, hue)
    h, w = sprite.shape[:2]
    x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
    mask = _place(canvas, sprite, x, y)
    return _finish(canvas), mask


def render_scene(
    class_names: Sequence[str], rng: np.random.Generator, size: int = 256, *, scale: tuple[float, float] = (0.2, 0.4)
) -> tuple[np.ndarray, np.ndarray]:
    """Several objects in one image, later ones drawn over earlier ones.

    Returns ``(image, masks)``: ``(size, size, 3) uint8`` and ``(K, size, size) bool`` visible-instance
    masks, one per class name in order (an object fully hidden by later ones has an empty mask).
    """
    if not class_names:
        raise ConfigError("render_scene needs at least one class name")
    sprites = [_sprite_for(select_classes([n])[0], rng, size, scale) for n in class_names]
    canvas = _background(rng, size, sprites[0][1])
    masks = np.zeros((len(sprites), size, size), bool)
    for k, (sprite, _) in enumerate(sprites):
        h, w = sprite.shape[:2]
        x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
        placed = _place(canvas, sprite, x, y)
        masks[:k] &= ~placed
        masks[k] = placed
    return _finish(canvas), masks


# --- dataset on disk -----------------------------------------------------------------------------------


def image_rng(seed: int, class_name: str, index: int) -> np.random.Generator:
    """The generator of one dataset image, independent of the other images."""
    return np.random.default_rng([seed, CLASS_NAMES.index(class_name), index])


def generate_dataset(
    out: str | Path, *, classes: int | Sequence[str] = 20, per_class: int = 50, size: int = 128, seed: int = 0,
    coco: bool = False,
) -> Path:
    """Write a synthetic labelled dataset (layout in the module docstring); returns ``out``. With
    ``coco``, also ``instances.coco.json`` (:func:`coco_ground_truth`).

    Refuses a non-empty ``out`` that is not a synthetic dataset, so nothing of the user's is mixed in.
    """
    out = Path(out)
    names = select_classes(classes)
    if per_class < 1:
        raise ConfigError(f"--per-class must be at least 1, got {per_class}")
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).exists():
        raise DatasetError(f"{out} exists and is not a synthetic dataset: choose an empty or new directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / COCO_FILE).unlink(missing_ok=True)  # a stale ground truth would not match the new images
    objects = []
    for name in names:
        folder = out / class_dir_name(name)
        folder.mkdir(exist_ok=True)
        for i in range(per_class):
            image, mask = render_object(name, image_rng(seed, name, i), size)
            Image.fromarray(image).save(folder / f"{i:05d}.png", compress_level=1)
            Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"{i:05d}{MASK_SUFFIX}", compress_level=1)
            if coco:
                objects.append((f"{class_dir_name(name)}/{i:05d}.png", name, _rle(mask)))
    manifest = {
        "format": "slip-synth",
        "version": 1,
        "seed": seed,
        "size": size,
        "per_class": per_class,
        "classes": [{"name": n, "dir": class_dir_name(n)} for n in names],
    }
    if coco:
        (out / COCO_FILE).write_text(json.dumps(coco_ground_truth(objects, names, size=size, seed=seed)))
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def coco_ground_truth(objects: Sequence[tuple[str, str, dict]], names: Sequence[str], *, size: int, seed: int) -> dict:
    """A COCO instances file for COCOeval: ``objects`` are ``(file name relative to the dataset, class
    name, mask RLE)``, one object per image.

    Images ``{"id": 1.., "file_name", "width", "height"}``; categories ``{"id": class index + 1, "name":
    class name, "supercategory": "shape"}`` in ``names`` order (prompts are matched to them by name);
    annotations ``{"id", "image_id", "category_id", "segmentation": RLE, "area", "bbox": toBbox(RLE),
    "iscrowd": 0}``.
    """
    category = {n: c + 1 for c, n in enumerate(names)}
    images, annotations = [], []
    for k, (file_name, name, rle) in enumerate(objects, start=1):
        images.append({"id": k, "file_name": file_name, "width": size, "height": size})
        annotations.append({"id": k, "image_id": k, "category_id": category[name], "segmentation": rle,
                            "area": int(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                            "iscrowd": 0})
    return {
        "info": {"description": "slip data synth ground truth", "seed": seed},
        "licenses": [],
        "images": images,
        "categories": [{"id": category[n], "name": n, "supercategory": "shape"} for n in names],
        "annotations": annotations,
    }
