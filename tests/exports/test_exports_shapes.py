"""``yolo`` labels read back and rasterised, ``polygons`` with holes, ``jsonl`` records."""

from __future__ import annotations

import json
import tracemalloc

import cv2
import numpy as np
import pytest
import yaml

from export_docs import disc, done_item, failed_item, ring_mask, v2_doc
from producer.exports import mask_polygons, write_export
from slip.errors import ConfigError

PROMPTS = ("circle", "ring", "pair")
H, W = 60, 80


def _masks() -> np.ndarray:
    """A disc, a disc with a hole, two separate discs (one instance in two parts), a 1-pixel speck."""
    speck = np.zeros((H, W), bool)
    speck[3, 77] = True
    return np.stack([disc(H, W, 20, 20, 10), ring_mask(H, W, 35, 50, 15, 6),
                     disc(H, W, 50, 10, 5) | disc(H, W, 8, 70, 4), speck])


def _doc(**chosen) -> dict:
    default = {"circle": [(0, 0.8)], "ring": [(1, 0.7)], "pair": [(2, 0.6), (3, 0.2)]}
    return v2_doc(_masks(), PROMPTS, {**default, **chosen})


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def _rasterise_row(row: str) -> tuple[int, np.ndarray]:
    """A YOLO segmentation row -> (class, (H, W) bool), as Ultralytics' polygon2mask draws it."""
    values = row.split()
    xy = np.array(values[1:], np.float64).reshape(-1, 2)
    assert len(xy) >= 3 and ((0 <= xy) & (xy <= 1)).all()
    points = np.round(xy * [W, H]).astype(np.int32)
    canvas = np.zeros((H, W), np.uint8)
    cv2.fillPoly(canvas, [points], 1)
    return int(values[0]), canvas.astype(bool)


def test_yolo_labels_rasterise_back_to_the_masks(tmp_path):
    items = [done_item(0, "cats/a.png", _doc(), image=b"png-a"), failed_item(1, "cats/b.png", "corrupt"),
             done_item(2, "cats/a.jpg", _doc(), image=b"jpg-a"),
             done_item(3, "c.png", _doc(circle=[], ring=[], pair=[]))]
    summary = write_export(items, format="yolo", out=tmp_path / "y", prompts=PROMPTS, job_id="j1", copy_images=True)
    assert (summary.written, summary.skipped, summary.instances) == (3, 1, 8)
    data = yaml.safe_load((tmp_path / "y" / "data.yaml").read_text())
    assert data["names"] == {0: "circle", 1: "ring", 2: "pair"} and data["train"] == "images"
    labels = tmp_path / "y" / "labels"
    written = sorted(p.relative_to(labels).as_posix() for p in labels.rglob("*.txt"))
    assert written == ["c.txt", "cats/a-2.txt", "cats/a.txt"]
    assert any("cats/a.jpg" in n and "a-2.txt" in n for n in summary.notes)
    assert (tmp_path / "y" / "images" / "cats" / "a.png").read_bytes() == b"png-a"
    assert (tmp_path / "y" / "images" / "cats" / "a-2.jpg").read_bytes() == b"jpg-a"
    assert (labels / "c.txt").read_text() == ""  # nothing found: a background image
    rows = (labels / "cats" / "a.txt").read_text().splitlines()
    masks = _masks()
    expected = [(0, masks[0]), (1, masks[1]), (2, masks[2]), (2, masks[3])]
    assert len(rows) == len(expected)
    for row, (cls, mask) in list(zip(rows, expected))[:2]:
        got_cls, got = _rasterise_row(row)
        assert got_cls == cls and _iou(got, mask) > 0.9, (cls, _iou(got, mask))
    _, ring = _rasterise_row(rows[1])
    assert not ring[35, 50]  # the hole stays a hole
    _, pair = _rasterise_row(rows[2])  # two parts, one polygon: all of both, plus the zero-width bridge
    assert pair[masks[2]].all() and _off_bridge(pair & ~masks[2], masks[2]) == 0
    _, speck = _rasterise_row(rows[3])
    assert speck[masks[3]].all() and speck.sum() <= 9  # a 1-pixel mask: its pixel box


def _off_bridge(extra: np.ndarray, mask: np.ndarray) -> int:
    """Extra pixels further than 1 px from the segment joining the nearest points of the mask's two parts."""
    (a,), (b,) = mask_polygons(mask)
    d = np.linalg.norm(a[:, None, :].astype(float) - b[None, :, :], axis=-1)
    i, j = np.unravel_index(d.argmin(), d.shape)
    p, q = a[i].astype(float), b[j].astype(float)
    ys, xs = np.nonzero(extra)
    points = np.stack([xs, ys], 1).astype(float)
    t = np.clip(((points - p) @ (q - p)) / ((q - p) @ (q - p)), 0, 1)
    return int((np.linalg.norm(points - (p + t[:, None] * (q - p)), axis=1) > 1.0).sum())


def test_yolo_refuses_a_folder_with_labels(tmp_path):
    write_export([done_item(0, "a.png", _doc())], format="yolo", out=tmp_path, prompts=PROMPTS, job_id="j")
    with pytest.raises(ConfigError, match="not empty"):
        write_export([done_item(0, "a.png", _doc())], format="yolo", out=tmp_path, prompts=PROMPTS, job_id="j")


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
        items = (done_item(k, f"d{k // 100}/{k:05d}.png", doc) for k in range(count))
        tracemalloc.start()
        write_export(items, format=format, out=tmp_path / str(count), prompts=PROMPTS, job_id="j")
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] - peaks[0] < 200_000, peaks  # 450 more items, no per-item state kept
