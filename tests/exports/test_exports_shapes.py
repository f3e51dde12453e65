"""``polygons`` with holes, ``jsonl`` records, mask geometry; streamed exports keep memory flat (yolo in
test_exports_yolo.py)."""

from __future__ import annotations

import json
import tracemalloc

import cv2
import numpy as np
import pytest

from export_docs import done_item, failed_item, sample_masks, v2_doc
from producer.exports import mask_polygons, write_export

PROMPTS = ("circle", "ring", "pair")
H, W = 60, 80


def _masks() -> np.ndarray:
    return sample_masks(H, W)


def _doc(**chosen) -> dict:
    default = {"circle": [(0, 0.8)], "ring": [(1, 0.7)], "pair": [(2, 0.6), (3, 0.2)]}
    return v2_doc(_masks(), PROMPTS, {**default, **chosen})


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_mask_polygons_keep_holes_as_interior_rings():
    polygons = mask_polygons(_masks()[1])
    assert len(polygons) == 1 and len(polygons[0]) == 2  # outer ring + one hole
    two_parts = mask_polygons(_masks()[2])
    assert len(two_parts) == 2 and all(len(p) == 1 for p in two_parts)
    (speck,) = mask_polygons(_masks()[3])
    assert speck[0].tolist() == [[76.5, 2.5], [77.5, 2.5], [77.5, 3.5], [76.5, 3.5]]


def _fill(rings: list) -> np.ndarray:
    canvas = np.zeros((H, W), np.uint8)
    outer, *holes = [np.array(r, np.int32) for r in rings]
    cv2.fillPoly(canvas, [outer], 1)
    for hole in holes:  # a hole's ring runs through the object's boundary pixels: keep those
        inside = np.zeros_like(canvas)
        cv2.fillPoly(inside, [hole], 1)
        edge = np.zeros_like(canvas)
        cv2.polylines(edge, [hole], True, 1)
        canvas[(inside == 1) & (edge == 0)] = 0
    return canvas.astype(bool)


def test_polygons_are_feature_collections_with_holes(tmp_path):
    items = [done_item(0, "a.png", _doc(pair=[])), failed_item(1, "b.png", "ImageError: not an image")]
    summary = write_export(items, format="polygons", out=tmp_path / "p.jsonl", prompts=PROMPTS, job_id="j")
    assert (summary.written, summary.instances) == (2, 2)
    done, failed = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert failed == {"type": "FeatureCollection", "index": 1, "name": "b.png", "state": "failed",
                      "reason": "ImageError: not an image", "not_found": [], "features": []}
    assert done["type"] == "FeatureCollection" and done["not_found"] == ["pair"]
    circle, ring = done["features"]
    assert [f["properties"]["prompt"] for f in done["features"]] == ["circle", "ring"]
    assert ring["geometry"]["type"] == "MultiPolygon"
    (polygon,) = ring["geometry"]["coordinates"]
    assert len(polygon) == 2 and all(r[0] == r[-1] for r in polygon)  # outer + hole, closed rings
    filled = _fill(polygon)
    assert not filled[35, 50] and _iou(filled, _masks()[1]) > 0.95
    assert _iou(_fill(circle["geometry"]["coordinates"][0]), _masks()[0]) > 0.95
    assert ring["properties"]["area"] == int(_masks()[1].sum())


def test_jsonl_records_answers_and_failures(tmp_path):
    items = [done_item(4, "a.png", _doc(pair=[])), failed_item(5, "b.png", "too large")]
    write_export(items, format="jsonl", out=tmp_path / "r.jsonl", prompts=PROMPTS, job_id="j")
    done, failed = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert failed == {"index": 5, "name": "b.png", "state": "failed", "reason": "too large"}
    assert done["image_size"] == {"height": H, "width": W}
    by_prompt = {a["prompt"]: a for a in done["answers"]}
    assert by_prompt["pair"]["instances"] == [] and by_prompt["pair"]["best"] is not None
    (circle,) = by_prompt["circle"]["instances"]
    assert circle["score"] == 0.8 and circle["area"] == int(_masks()[0].sum())
    assert circle["bbox"] == [10.0, 10.0, 21.0, 21.0]


@pytest.mark.parametrize("format", ["yolo", "polygons"])
def test_memory_does_not_grow_with_the_job(tmp_path, format):
    doc = _doc()
    peaks = []
    for count in (50, 500):
        items = (done_item(k, f"d{k // 100}/{k:05d}.png", doc, image=b"png") for k in range(count))
        options = {"images": "copy"} if format == "yolo" else {}
        tracemalloc.start()
        write_export(items, format=format, out=tmp_path / str(count), prompts=PROMPTS, job_id="j", **options)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] - peaks[0] < 200_000, peaks  # 450 more items, no per-item state kept
