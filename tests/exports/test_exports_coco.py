"""``coco`` and ``coco-results`` exports, read back with pycocotools; streaming in bounded memory."""

from __future__ import annotations

import contextlib
import io
import json
import tracemalloc

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from export_docs import disc, done_item, failed_item, ring_mask, v2_doc
from producer.exports import ExportItem, read_coco_ids, write_export
from slip.errors import ConfigError, DatasetError, InputError
from slip.outputs import encode_rle

PROMPTS = ("circle", "ring", "star")
H, W = 60, 80


def _masks() -> np.ndarray:
    return np.stack([disc(H, W, 20, 20, 10), ring_mask(H, W, 35, 50, 15, 6), disc(H, W, 50, 10, 5)])


def _items() -> list[ExportItem]:
    doc = v2_doc(_masks(), PROMPTS, {"circle": [(0, 0.8)], "ring": [(1, 0.7), (2, 0.3)], "star": []})
    return [done_item(0, "cats/a.png", doc), failed_item(1, "cats/b.png", "ImageError: truncated"),
            done_item(2, "dogs/c.jpg", doc), ExportItem(3, "d.png", "lost", None, "worker died", None)]


def _coco(path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def test_coco_is_an_instances_dataset_with_every_instance(tmp_path):
    out = tmp_path / "job.coco.json"
    summary = write_export(_items(), format="coco", out=out, prompts=PROMPTS, job_id="j1")
    assert (summary.written, summary.skipped, summary.instances) == (2, 2, 6)
    coco = _coco(out)
    assert [c["name"] for c in coco.dataset["categories"]] == list(PROMPTS)
    assert sorted(i["file_name"] for i in coco.dataset["images"]) == ["cats/a.png", "dogs/c.jpg"]
    assert {i["id"] for i in coco.dataset["images"]} == {1, 3}  # manifest index + 1
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[1]))
    assert sorted((a["category_id"], a["score"]) for a in anns) == [(1, 0.8), (2, 0.3), (2, 0.7)]
    masks = _masks()
    for ann in anns:
        mask = masks[ann["slip_segment"]]
        assert ann["bbox"] == [float(v) for v in mask_utils.toBbox(ann["segmentation"])]
        x, y, w, h = ann["bbox"]
        ys, xs = np.nonzero(mask)
        assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
        assert ann["area"] == int(mask.sum())
        assert np.array_equal(coco.annToMask(ann).astype(bool), mask)
    assert not (tmp_path / "job.coco.json.partial").exists()


def test_coco_results_load_against_the_coco_export(tmp_path):
    write_export(_items(), format="coco", out=tmp_path / "gt.json", prompts=PROMPTS, job_id="j1")
    summary = write_export(_items(), format="coco-results", out=tmp_path / "dt.json", prompts=PROMPTS, job_id="j1")
    assert summary.instances == 6
    results = json.loads((tmp_path / "dt.json").read_text())
    assert set(results[0]) == {"image_id", "category_id", "segmentation", "bbox", "score"}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = _coco(tmp_path / "gt.json").loadRes(str(tmp_path / "dt.json"))
    assert len(dt.anns) == 6


def _ground_truth(path, names: list[str]) -> None:
    """A COCO ground truth with its own ids: images 10, 11; categories by name with ids 7, 3, 5."""
    rle = encode_rle(_masks()[:1])[0]
    path.write_text(json.dumps({
        "images": [{"id": 10 + k, "file_name": n, "width": W, "height": H} for k, n in enumerate(names)],
        "categories": [{"id": 7, "name": "star"}, {"id": 3, "name": "circle"}, {"id": 5, "name": "ring"}],
        "annotations": [{"id": 1, "image_id": 10, "category_id": 3, "segmentation": rle, "area": 1,
                         "bbox": [0, 0, 1, 1], "iscrowd": 0}]}))


def test_coco_results_take_the_ground_truths_ids(tmp_path):
    gt = tmp_path / "gt.json"
    _ground_truth(gt, ["cats/a.png", "other.png"])
    ids = read_coco_ids(gt)
    summary = write_export(_items(), format="coco-results", out=tmp_path / "dt.json", prompts=PROMPTS,
                           job_id="j1", image_ids=ids.image_ids, category_ids=ids.category_ids)
    assert (summary.written, summary.instances) == (1, 3)
    assert summary.skipped == 3 and any("dogs/c.jpg" in n for n in summary.notes)
    results = json.loads((tmp_path / "dt.json").read_text())
    assert {r["image_id"] for r in results} == {10}
    assert sorted(r["category_id"] for r in results) == [3, 5, 5]
    with contextlib.redirect_stdout(io.StringIO()):
        dt = _coco(gt).loadRes(str(tmp_path / "dt.json"))
    assert len(dt.anns) == 3


def test_coco_results_refuse_unknown_prompts_and_foreign_images(tmp_path):
    gt = tmp_path / "gt.json"
    _ground_truth(gt, ["x.png"])
    ids = read_coco_ids(gt)
    with pytest.raises(ConfigError, match="'moon'.*not categories"):
        write_export(_items(), format="coco-results", out=tmp_path / "a.json", prompts=("circle", "moon"),
                     job_id="j", image_ids=ids.image_ids, category_ids=ids.category_ids)
    with pytest.raises(DatasetError, match="no image of the job is in the ground truth"):
        write_export(_items(), format="coco-results", out=tmp_path / "b.json", prompts=PROMPTS, job_id="j",
                     image_ids=ids.image_ids, category_ids=ids.category_ids)
    assert not list(tmp_path.glob("b.json*"))  # nothing half-written is left behind


@pytest.mark.parametrize("content, message", [
    (None, "cannot read"), ("{not json", "not JSON"), ('{"images": []}', "not a COCO annotation file"),
    ('{"images": [], "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "a"}]}', "same name"),
])
def test_read_coco_ids_says_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "gt.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DatasetError, match=message):
        read_coco_ids(path)


def test_version_1_documents_are_read(tmp_path):
    doc = v2_doc(_masks(), PROMPTS, {})
    doc["format_version"] = 1
    doc["matches"] = [{"prompt": "circle", "segment": 0, "score": 0.9, "top_k": []},
                      {"prompt": "star", "segment": None, "score": 0.1, "top_k": []}]
    write_export([done_item(0, "a.png", doc)], format="coco", out=tmp_path / "c.json", prompts=PROMPTS, job_id="j")
    anns = json.loads((tmp_path / "c.json").read_text())["annotations"]
    assert [(a["category_id"], a["score"], a["slip_segment"]) for a in anns] == [(1, 0.9, 0)]


def test_errors_name_the_item_and_the_option(tmp_path):
    doc = v2_doc(_masks(), PROMPTS, {"circle": [(9, 0.8)]})  # segment 9 does not exist
    with pytest.raises(DatasetError, match="cats/bad.png"):
        write_export([done_item(0, "cats/bad.png", doc)], format="coco", out=tmp_path / "c.json",
                     prompts=PROMPTS, job_id="j")
    with pytest.raises(ConfigError, match="unknown export format"):
        write_export([], format="voc", out=tmp_path / "v", prompts=PROMPTS, job_id="j")
    with pytest.raises(ConfigError, match="coco-results only"):
        write_export([], format="coco", out=tmp_path / "c.json", prompts=PROMPTS, job_id="j", image_ids={})
    with pytest.raises(ConfigError, match="yolo only"):
        write_export([], format="jsonl", out=tmp_path / "c.jsonl", prompts=PROMPTS, job_id="j", images="copy")
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="cannot write"):
        write_export(_items(), format="coco", out=tmp_path / "file" / "c.json", prompts=PROMPTS, job_id="j")


def _stream(count: int, doc: dict):
    for k in range(count):
        yield done_item(k, f"d{k // 1000}/{k:06d}.png", doc) if k % 10 else failed_item(k, f"{k}.png", "bad")


@pytest.mark.parametrize("format", ["coco", "coco-results", "jsonl"])
def test_memory_does_not_grow_with_the_job(tmp_path, format):
    doc = v2_doc(_masks(), PROMPTS, {"circle": [(0, 0.8)], "ring": [(1, 0.7), (2, 0.3)], "star": []})
    peaks = []
    for count in (200, 2000):
        tracemalloc.start()
        write_export(_stream(count, doc), format=format, out=tmp_path / f"{count}.out", prompts=PROMPTS, job_id="j")
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    # 1800 more items: keeping anything per item (an annotation dict is > 1 kB) would add megabytes
    assert peaks[1] - peaks[0] < 500_000, peaks
