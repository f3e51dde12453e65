"""Labelled image folders: one sub-directory per class, captions from a template, a seeded split.

Layout (the Kaggle "Pokemon Generation One" dataset works as is; so does :mod:`slip.data.synth`)::

    ROOT/<class dir>/<image>.{png,jpg,jpeg,bmp,gif,webp,tif,tiff}
    ROOT/<class dir>/<image stem>.mask.png     optional ground-truth object mask (L, 0/255)
    ROOT/classes.json                          optional: display names {"classes": [{"name", "dir"}]}

Files named ``*.mask.png`` are masks, never images. Display names come from ``classes.json`` when it
exists (which also fixes the label order), otherwise from the directory name (``"Mr_Mime"`` /
``"MrMime"`` -> ``"Mr Mime"``) with labels in alphabetical order of the directories.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from slip.errors import ConfigError, DatasetError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
MASK_SUFFIX = ".mask.png"
MAX_PIXELS = 40_000_000  # refuse larger images (decompression-bomb guard)


@dataclass(frozen=True)
class ImageRecord:
    """One labelled image on disk."""

    path: Path  # the image file
    label: int  # class index into LabelledFolder.class_names
    mask_path: Path | None  # its ground-truth object mask (synthetic data), or None


@dataclass(frozen=True)
class LabelledFolder:
    """A scanned dataset directory."""

    root: Path  # the dataset directory
    class_names: tuple[str, ...]  # display names, index = label
    class_dirs: tuple[str, ...]  # directory names, same order
    records: tuple[ImageRecord, ...]  # every image, by class (label order), then file name
    caption_template: str = "{name}"  # caption of class c: template.format(name=class_names[c])

    @property
    def captions(self) -> tuple[str, ...]:
        """The caption of each class, index = label."""
        return tuple(self.caption_template.format(name=n) for n in self.class_names)

    @property
    def has_masks(self) -> bool:
        """True when every image has a ground-truth object mask."""
        return all(r.mask_path is not None for r in self.records)


def clean_class_name(directory: str) -> str:
    """Display name of a class directory: ``_``/``-`` -> space, ``camelCase`` split, blanks collapsed."""
    name = re.sub(r"[_\-]+", " ", directory)
    name = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name)
    return re.sub(r"\s+", " ", name).strip()


def check_template(template: str) -> str:
    """A caption template must contain ``{name}`` and nothing else in braces."""
    try:
        sample = template.format(name="x")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"caption template {template!r} is invalid: use {{name}} for the class name") from e
    if "{name}" not in template or not sample.strip():
        raise ConfigError(f"caption template {template!r} must contain {{name}}, e.g. '{{name}}' or 'a photo of {{name}}'")
    return template


def _display_names(root: Path, dirs: list[str]) -> dict[str, str]:
    """Class dir -> display name, ordered as in ``classes.json`` (when present), then alphabetically."""
    manifest = root / "classes.json"
    names = {d: clean_class_name(d) for d in dirs}
    if not manifest.is_file():
        return names
    try:
        entries = [e for e in json.loads(manifest.read_text())["classes"] if e["dir"] in names]
        listed = {e["dir"]: str(e["name"]) for e in entries}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"{manifest} is malformed ({e}); fix or delete it") from e
    return {**listed, **{d: n for d, n in names.items() if d not in listed}}


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.lower().endswith(MASK_SUFFIX) and not path.name.startswith(".")


def scan_folder(root: str | Path, *, caption_template: str = "{name}") -> LabelledFolder:
    """Index ``root`` (layout in the module docstring); needs at least 2 classes with images."""
    root = Path(root)
    check_template(caption_template)
    if not root.is_dir():
        raise DatasetError(f"dataset directory {root} does not exist: expected one sub-directory per class")
    dirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = {d: sorted(p for p in (root / d).iterdir() if _is_image(p)) for d in dirs}
    dirs = [d for d in dirs if files[d]]
    if len(dirs) < 2:
        raise DatasetError(f"{root} has {len(dirs)} class directories with images; a labelled dataset needs at least 2")
    names = _display_names(root, dirs)
    dirs = list(names)
    records = []
    for label, d in enumerate(dirs):
        for path in files[d]:
            mask = path.with_name(path.stem + MASK_SUFFIX)
            records.append(ImageRecord(path=path, label=label, mask_path=mask if mask.is_file() else None))
    return LabelledFolder(
        root=root,
        class_names=tuple(names[d] for d in dirs),
        class_dirs=tuple(dirs),
        records=tuple(records),
        caption_template=caption_template,
    )


def split_records(
    records: tuple[ImageRecord, ...], *, val_fraction: float = 0.2, seed: int = 0
) -> tuple[tuple[ImageRecord, ...], tuple[ImageRecord, ...]]:
    """Seeded ``(train, val)`` split by image, stratified per class.

    Each class with ``n >= 2`` images puts ``max(1, round(val_fraction * n))`` of them in ``val``; the
    order inside each part follows ``records``.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"validation fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    by_label: dict[int, list[int]] = {}
    for i, r in enumerate(records):
        by_label.setdefault(r.label, []).append(i)
    val_index: set[int] = set()
    for label in sorted(by_label):
        idx = by_label[label]
        if len(idx) < 2:
            continue
        k = min(max(1, round(val_fraction * len(idx))), len(idx) - 1)
        val_index.update(int(i) for i in rng.permutation(idx)[:k])
    train = tuple(r for i, r in enumerate(records) if i not in val_index)
    val = tuple(r for i, r in enumerate(records) if i in val_index)
    return train, val


def load_rgb(path: Path) -> np.ndarray:
    """``(H, W, 3) uint8`` RGB of an image file (EXIF orientation applied); DatasetError when unreadable."""
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                raise DatasetError(f"{path} has {im.width}x{im.height} pixels, over the {MAX_PIXELS} limit")
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                flat = Image.new("RGBA", im.size, (255, 255, 255, 255))  # transparent -> white
                im = Image.alpha_composite(flat, im)
            return np.array(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"cannot read image {path}: {e}") from e


def load_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """``(H, W) bool`` object mask from an ``L`` PNG (nonzero = object); must match ``shape``."""
    try:
        with Image.open(path) as im:
            mask = np.asarray(im.convert("L")) >= 128
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DatasetError(f"cannot read mask {path}: {e}") from e
    if mask.shape != tuple(shape):
        raise DatasetError(f"mask {path} is {mask.shape[::-1]} (W, H) but its image is {tuple(shape)[::-1]}")
    return mask
