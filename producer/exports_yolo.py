"""``yolo``: an Ultralytics segmentation dataset you can train on, a folder.

Layout (``yolo train data=OUT/data.yaml`` reads it as it is)::

    OUT/images/train/<dir>/<name>        the images: copies (images="copy") or symlinks to the store's files
    OUT/images/val/<dir>/<name>          ("link"); val holds a seeded share of them (val_fraction)
    OUT/labels/{train,val}/<dir>/<stem>.txt   one row per instance: "class x1 y1 x2 y2 ..." (polygon / W, H)
    OUT/data.yaml                        path, train: images/train, val: images/val, names: {class: prompt}

Ultralytics finds an image's labels by replacing the last ``/images/`` of its path with ``/labels/``, so
label paths mirror image paths; a name part called ``images`` is written as ``images_`` (noted), which
would otherwise misdirect it. Two names with the same stem in one folder (``a.jpg``, ``a.png``) get
``a.txt`` and ``a-2.txt`` (and ``a-2.png``); the summary notes each rename. YOLO has one polygon per
instance: the parts and holes of a mask are joined into one ring by zero-width bridges (as Ultralytics
does for COCO instances of several parts). Images with no instance get an empty label file (background).

Split: an image goes to val when the seeded hash of its name (sha256 of ``"<seed>:<name>"`` as a number
in [0, 1)) is below ``val_fraction``: the same image lands on the same side in every export with the same
seed, whatever else the job holds, and memory stays constant. When that leaves a side empty, the image
nearest to the cut on the other side moves over (one image: it serves as both, noted). ``val_fraction=0``:
no val folder; data.yaml names the train images as val too (noted).

An image that cannot be copied or linked is left out with its labels (noted). ``data.yaml`` is written
last and only when train and val hold images; a folder without it is an unfinished export.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from producer.exports_items import DONE, ExportItem, Instance, Tally, answers, atomic_file, image_size, item_doc
from producer.exports_shapes import mask_polygons, single_ring
from slip.errors import ConfigError, DatasetError, SlipError

IMAGE_MODES = ("copy", "link")
TRAIN, VAL = "train", "val"


@dataclass
class _Placed:
    """One written image: its split, hash position, and files (relative to OUT)."""

    split: str
    position: float  # the name's seeded hash in [0, 1)
    image: str  # images/<split>/<stem><ext>
    label: str  # labels/<split>/<stem>.txt


def write_yolo(
    items: Iterable[ExportItem], *, out: Path, prompts: Sequence[str], job_id: str, tally: Tally,
    images: str | None, val_fraction: float = 0.1, seed: int = 0,
) -> None:
    """The ``yolo`` folder (module docstring). ``images``: ``"copy"`` (bytes from the store) or ``"link"``
    (symlinks to ``ExportItem.image_file``). Raises :class:`ConfigError` for a missing image mode, a bad
    fraction or a non-empty ``OUT/labels``, :class:`DatasetError` when no image could be written."""
    _check(out, images, val_fraction)
    counts, edges = {TRAIN: 0, VAL: 0}, {TRAIN: None, VAL: None}  # edges: the image nearest to the cut
    for item in tally.keep(items, frozenset({DONE})):
        position = _position(item.name, seed)
        split = VAL if position < val_fraction else TRAIN
        placed = _place(item, out=out, split=split, position=position, images=images, tally=tally)
        if placed is None:
            tally.skipped += 1
            continue
        rows = _rows(item, prompts)
        _write(os.path.join(out, placed.label), "".join(row + "\n" for row in rows).encode())
        counts[split] += 1
        edge = edges[split]
        if edge is None or abs(position - val_fraction) < abs(edge.position - val_fraction):
            edges[split] = placed
        tally.written += 1
        tally.instances += len(rows)
    val = _balance(out, counts, edges, val_fraction, tally)
    _write_data_yaml(out, prompts, job_id, val)


def _check(out: Path, images: str | None, val_fraction: float) -> None:
    if images not in IMAGE_MODES:
        raise ConfigError("--format yolo needs --copy-images or --link-images: data.yaml must point at the images "
                          "(Ultralytics pairs images/ and labels/)")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    for folder in (out / "labels", out / "images"):
        if folder.is_dir() and any(folder.iterdir()):
            raise ConfigError(f"{folder} is not empty: choose a new --out folder for a YOLO export")


def _position(name: str, seed: int) -> float:
    """The name's seeded hash as a number in [0, 1)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _place(item: ExportItem, *, out: Path, split: str, position: float, images: str,
           tally: Tally) -> _Placed | None:
    """Copy or link the item's image under ``images/<split>``; None (noted) when it cannot be."""
    stem = _free_stem(os.path.join(out, "labels", split), item.name, tally)
    ext = posixpath.splitext(item.name)[1]
    placed = _Placed(split, position, f"images/{split}/{stem}{ext}", f"labels/{split}/{stem}.txt")
    target = os.path.join(out, placed.image)
    if images == "link":
        if item.image_file is None:
            raise ConfigError("--link-images needs a directory store (SLIP_STORE is not a local folder): "
                              "use --copy-images")
        source = os.path.abspath(item.image_file)
        if not os.path.isfile(source):
            tally.note(f"{item.name}: left out (its image {source} is missing)")
            return None
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.symlink(source, target)
        return placed
    if item.image is None:
        tally.note(f"{item.name}: left out (the store gave no image)")
        return None
    try:
        data = item.image()
    except SlipError as e:
        tally.note(f"{item.name}: left out (image not copied: {e})")
        return None
    _write(target, data)
    return placed


def _rows(item: ExportItem, prompts: Sequence[str]) -> list[str]:
    height, width = image_size(item_doc(item))
    return [_yolo_row(inst, width, height) for a in answers(item.doc, prompts, name=item.name)
            for inst in a.instances]


def _yolo_row(inst: Instance, width: int, height: int) -> str:
    polygons = mask_polygons(inst.mask())
    if polygons:
        ring = single_ring(polygons)
    else:  # an empty mask: its (empty) box as a degenerate polygon keeps the instance
        x, y, w, h = inst.bbox()
        ring = np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], np.float64)
    xy = np.clip(ring / np.array([width, height], np.float64), 0.0, 1.0)
    return f"{inst.category} " + " ".join(["%.6f"] * xy.size) % tuple(xy.reshape(-1).tolist())


def _balance(out: Path, counts: dict[str, int], edges: dict, val_fraction: float, tally: Tally) -> str:
    """Make both sides hold images (module docstring); the folder data.yaml names as val."""
    total = counts[TRAIN] + counts[VAL]
    if total == 0:
        raise DatasetError("no image could be written (none done, or none copied / linked): data.yaml not written")
    if val_fraction == 0:
        tally.note("val = train (no --val-fraction): the validation figures will flatter the model")
        return f"images/{TRAIN}"
    if total == 1:
        only = TRAIN if counts[TRAIN] else VAL
        tally.note(f"only one image: it is both train and val (images/{only})")
        return f"images/{only}"
    for empty, full in ((VAL, TRAIN), (TRAIN, VAL)):
        if counts[empty] == 0:
            moved = _move(out, edges[full], empty)
            tally.note(f"{moved.image}: moved to {empty} (the split left {empty} empty)")
    return f"images/{VAL}"


def _move(out: Path, placed: _Placed, split: str) -> _Placed:
    image = f"images/{split}/" + placed.image.split("/", 2)[2]
    label = f"labels/{split}/" + placed.label.split("/", 2)[2]
    for old, new in ((placed.image, image), (placed.label, label)):
        os.makedirs(os.path.dirname(os.path.join(out, new)), exist_ok=True)
        os.replace(os.path.join(out, old), os.path.join(out, new))
    return _Placed(split, placed.position, image, label)


def _free_stem(labels: str, name: str, tally: Tally) -> str:
    """``<dir>/<stem>`` of the item name, made safe, with ``-2``, ``-3``... when its label file exists.
    (Plain strings, not pathlib: pathlib interns every path part, which grows with the job.)"""
    parts = [p if p != ".." else "__" for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts:
        raise DatasetError(f"an item has an empty name ({name!r})")
    if "images" in parts[:-1]:
        parts = [p if p != "images" else "images_" for p in parts[:-1]] + parts[-1:]
        tally.note(f"{name}: written under {'/'.join(parts[:-1])}/ (Ultralytics reads an 'images' folder as the "
                   "image root)")
    base = posixpath.splitext("/".join(parts))[0]
    stem, k = base, 1
    while os.path.exists(os.path.join(labels, stem + ".txt")):
        k += 1
        stem = f"{base}-{k}"
    if k > 1:
        tally.note(f"{name}: {stem}.txt (another image has the same stem)")
    return stem


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _write_data_yaml(out: Path, prompts: Sequence[str], job_id: str, val: str) -> None:
    names = "".join(f"  {c}: {json.dumps(p)}\n" for c, p in enumerate(prompts))
    with atomic_file(out / "data.yaml") as f:
        f.write(f"# SLIP queue job {job_id}: YOLO segmentation dataset (Ultralytics layout)\n"
                f"path: {json.dumps(str(out.resolve()))}\ntrain: images/{TRAIN}\nval: {val}\nnames:\n{names}")
