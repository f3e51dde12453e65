"""Per-image exports: ``jsonl`` records and ``polygons`` (GeoJSON-like), and the mask geometry they share.

``jsonl`` (one file, one line per image, done and failed)::

    {"index", "name", "state": "done", "image_size": {"height", "width"},
     "answers": [{"prompt", "category_id", "threshold", "best": {"segment", "score"} | null,
                  "instances": [{"segment", "score", "bbox": toBbox(RLE), "area", "segmentation": RLE}]}]}
    {"index", "name", "state": "failed", "reason"}

``instances: []`` is an explicit "not found".

``polygons`` (one JSON Lines file, one GeoJSON FeatureCollection per image, done and failed)::

    {"type": "FeatureCollection", "name", "index", "state", "image_size", "not_found": [prompt, ...],
     "reason" (failed only),
     "features": [{"type": "Feature", "properties": {"prompt", "category_id", "score", "segment", "bbox", "area"},
                   "geometry": {"type": "MultiPolygon", "coordinates": [[outer ring, hole ring, ...], ...]}}]}

Coordinates are pixels ``[x, y]`` (x right, y down) of the mask's boundary pixels, as
``cv2.findContours(RETR_CCOMP)`` traces them; holes are interior rings; rings are closed (first point
repeated). A part too thin to enclose an area (a line or a single pixel) is written as the box around
its pixels (``±0.5``).

``yolo`` lives in :mod:`producer.exports_yolo` (it uses :func:`mask_polygons` and :func:`single_ring`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np

from producer.exports_items import (DONE, FAILED, Answer, ExportItem, Instance, Tally, answers, atomic_file,
                                    image_size, item_doc)

BOTH = frozenset({DONE, FAILED})


# --- geometry --------------------------------------------------------------------------------------


def mask_polygons(mask: np.ndarray) -> list[list[np.ndarray]]:
    """``(H, W) bool`` -> polygons, each ``[outer ring, *hole rings]``; a ring is ``(K, 2)`` XY pixels
    (int32, or float64 for a thin part written as its box), not closed. Largest polygon first."""
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return []
    links = hierarchy[0]  # (N, 4): next, previous, first child, parent
    polygons = []
    for i, contour in enumerate(contours):
        if links[i][3] != -1:  # a hole: added with its outer ring
            continue
        rings, child = [_ring(contour)], links[i][2]
        while child != -1:
            rings.append(_ring(contours[child]))
            child = links[child][0]
        polygons.append(rings)
    return sorted(polygons, key=lambda rings: -cv2.contourArea(rings[0].astype(np.float32)))


def _ring(contour: np.ndarray) -> np.ndarray:
    points = contour[:, 0, :]
    if len(points) > 8 or len(set(map(tuple, points.tolist()))) >= 3:
        return points
    (x0, y0), (x1, y1) = points.min(0) - 0.5, points.max(0) + 0.5
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)


def single_ring(polygons: list[list[np.ndarray]]) -> np.ndarray:
    """All rings of ``polygons`` joined into one ``(K, 2)`` float ring: each next ring is inserted at its
    nearest point to the path so far and traversed fully (a zero-width bridge out and back)."""
    from scipy.spatial import cKDTree  # imported here: `slip --help` loads this module and need not pay for scipy

    rings = [ring.astype(np.float64) for rings in polygons for ring in rings]
    path = rings[0]
    for ring in rings[1:]:
        distance, nearest = cKDTree(path).query(ring)
        j = int(np.argmin(distance))
        i = int(nearest[j])
        path = np.concatenate([path[: i + 1], ring[j:], ring[: j + 1], path[i:]])
    return path


def _closed(ring: np.ndarray) -> list:
    return ring.tolist() + ring[:1].tolist()


# --- jsonl -----------------------------------------------------------------------------------------


def write_jsonl(items: Iterable[ExportItem], *, out: Path, prompts: Sequence[str], tally: Tally) -> None:
    """The ``jsonl`` file (module docstring), one line per done or failed item."""
    with atomic_file(out) as f:
        for item in tally.keep(items, BOTH):
            record = _base_record(item)
            if item.state == DONE:
                found = answers(item_doc(item), prompts, name=item.name)
                record["answers"] = [_answer_record(a) for a in found]
                tally.instances += sum(len(a.instances) for a in found)
            f.write(json.dumps(record) + "\n")
            tally.written += 1


def _base_record(item: ExportItem) -> dict:
    record = {"index": item.index, "name": item.name, "state": item.state}
    if item.state == DONE:
        height, width = image_size(item_doc(item))
        record["image_size"] = {"height": height, "width": width}
    else:
        record["reason"] = item.reason
    return record


def _answer_record(answer: Answer) -> dict:
    return {
        "prompt": answer.prompt,
        "category_id": answer.category + 1,
        "threshold": answer.threshold,
        "best": None if answer.best is None else {"segment": answer.best[0], "score": answer.best[1]},
        "instances": [{"segment": i.segment, "score": i.score, "bbox": i.bbox(), "area": i.area(),
                       "segmentation": i.rle} for i in answer.instances],
    }


# --- polygons --------------------------------------------------------------------------------------


def write_polygons(items: Iterable[ExportItem], *, out: Path, prompts: Sequence[str], tally: Tally) -> None:
    """The ``polygons`` JSON Lines file (module docstring), one FeatureCollection per done or failed item."""
    with atomic_file(out) as f:
        for item in tally.keep(items, BOTH):
            record = {"type": "FeatureCollection", **_base_record(item), "not_found": [], "features": []}
            for answer in answers(item.doc, prompts, name=item.name) if item.state == DONE else []:
                if not answer.instances:
                    record["not_found"].append(answer.prompt)
                record["features"] += [_feature(answer, inst) for inst in answer.instances]
            f.write(json.dumps(record) + "\n")
            tally.written += 1
            tally.instances += len(record["features"])


def _feature(answer: Answer, inst: Instance) -> dict:
    coordinates = [[_closed(ring) for ring in rings] for rings in mask_polygons(inst.mask())]
    return {
        "type": "Feature",
        "properties": {"prompt": answer.prompt, "category_id": inst.category + 1, "score": inst.score,
                       "segment": inst.segment, "bbox": inst.bbox(), "area": inst.area()},
        "geometry": {"type": "MultiPolygon", "coordinates": coordinates},
    }
