"""``yolo``: a dataset Ultralytics itself loads (``check_det_dataset`` and its ``YOLODataset``, in a child
process with the network blocked), labels that rasterise back to the masks, the seeded train / val split,
``--min-score``, and no ``data.yaml`` that points at nothing."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from export_docs import disc, done_item, failed_item, sample_masks, v2_doc
from producer.exports import ExportItem, mask_polygons, write_export
from slip.errors import ConfigError, DatasetError
from ultralytics_check import load_in_ultralytics

PROMPTS = ("circle", "ring", "pair")
H, W = 60, 80


def _doc(**chosen) -> dict:
    default = {"circle": [(0, 0.8)], "ring": [(1, 0.7)], "pair": [(2, 0.6), (3, 0.2)]}
    return v2_doc(sample_masks(H, W), PROMPTS, {**default, **chosen})


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


def _files(folder: Path, pattern: str = "*") -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob(pattern) if not p.is_dir())


def test_yolo_labels_rasterise_back_to_the_masks(tmp_path):
    items = [done_item(0, "cats/a.png", _doc(), image=b"png-a"), failed_item(1, "cats/b.png", "corrupt"),
             done_item(2, "cats/a.jpg", _doc(), image=b"jpg-a"),
             done_item(3, "c.png", _doc(circle=[], ring=[], pair=[]), image=b"png-c")]
    out = tmp_path / "y"
    summary = write_export(items, format="yolo", out=out, prompts=PROMPTS, job_id="j1", images="copy",
                           val_fraction=0)
    assert (summary.written, summary.skipped, summary.instances) == (3, 1, 8)
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert data["names"] == {0: "circle", 1: "ring", 2: "pair"}
    assert data["train"] == data["val"] == "images/train" and any("val = train" in n for n in summary.notes)
    labels = out / "labels" / "train"
    assert _files(labels) == ["c.txt", "cats/a-2.txt", "cats/a.txt"]
    assert _files(out / "images" / "train") == ["c.png", "cats/a-2.jpg", "cats/a.png"]
    assert any("cats/a.jpg" in n and "a-2.txt" in n for n in summary.notes)
    assert (out / "images" / "train" / "cats" / "a-2.jpg").read_bytes() == b"jpg-a"
    assert (labels / "c.txt").read_text() == ""  # nothing found: a background image
    rows = (labels / "cats" / "a.txt").read_text().splitlines()
    masks = sample_masks(H, W)
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


@pytest.mark.parametrize("mode", ["copy", "link"])
def test_ultralytics_loads_the_dataset_with_a_disjoint_val_split(synth_run, tmp_path, mode):
    """Real pipeline results on real PNGs: Ultralytics' own loader finds every image, pairs each with its
    labels, and train and val share no image."""
    out = tmp_path / "dataset"
    summary = write_export(synth_run.items, format="yolo", out=out, prompts=synth_run.prompts, job_id="j",
                           images=mode, val_fraction=0.34, seed=3)
    assert summary.written == len(synth_run.items) and summary.skipped == 0
    loaded = load_in_ultralytics(out / "data.yaml", tmp_path / "yolo-config")
    assert loaded["names"] == {str(c): p for c, p in enumerate(synth_run.prompts)}
    assert loaded["train"]["images"] and loaded["val"]["images"]
    assert not set(loaded["train"]["images"]) & set(loaded["val"]["images"])
    assert len(loaded["train"]["images"]) + len(loaded["val"]["images"]) == summary.written
    assert loaded["train"]["instances"] + loaded["val"]["instances"] == summary.instances > 0
    assert set(loaded["train"]["classes"] + loaded["val"]["classes"]) <= set(range(len(synth_run.prompts)))
    sources = {item.name: Path(item.image_file) for item in synth_run.items}
    for path in map(Path, loaded["train"]["images"] + loaded["val"]["images"]):
        name = path.relative_to(out / "images").as_posix().split("/", 1)[1]
        assert path.read_bytes() == sources[name].read_bytes()
        assert path.is_symlink() == (mode == "link")
        if mode == "link":
            assert path.resolve() == sources[name].resolve()


def test_split_is_seeded_stable_and_close_to_the_fraction(tmp_path):
    doc = _doc()

    def split(seed: int, count: int) -> dict[str, str]:
        out = tmp_path / f"s{seed}-{count}-{len(list(tmp_path.iterdir()))}"
        items = [done_item(k, f"d/{k:04d}.png", doc, image=b"png") for k in range(count)]
        write_export(items, format="yolo", out=out, prompts=PROMPTS, job_id="j", images="copy", val_fraction=0.2,
                     seed=seed)
        return {name: side for side in ("train", "val") for name in _files(out / "images" / side)}

    first, again, other = split(0, 300), split(0, 300), split(1, 300)
    assert first == again, "the same seed gives the same split"
    assert first != other, "another seed gives another split"
    val = sum(side == "val" for side in first.values())
    assert 40 <= val <= 80, val  # 20 % of 300 = 60; the hash is fixed, so this never flakes
    grown = split(0, 400)
    assert all(grown[name] == side for name, side in first.items()), "a bigger job does not reshuffle"


def test_split_never_leaves_val_or_train_empty(tmp_path):
    doc = _doc()
    few = [done_item(k, f"{k}.png", doc, image=b"png") for k in range(3)]
    summary = write_export(few, format="yolo", out=tmp_path / "few", prompts=PROMPTS, job_id="j", images="copy",
                           val_fraction=0.01)
    assert len(_files(tmp_path / "few" / "images" / "val")) == 1 == len(_files(tmp_path / "few" / "labels" / "val"))
    assert len(_files(tmp_path / "few" / "images" / "train")) == 2
    assert any("moved to val" in n for n in summary.notes)
    summary = write_export(few, format="yolo", out=tmp_path / "most", prompts=PROMPTS, job_id="j", images="copy",
                           val_fraction=0.99)
    assert len(_files(tmp_path / "most" / "images" / "train")) == 1
    assert len(_files(tmp_path / "most" / "images" / "val")) == 2
    summary = write_export(few[:1], format="yolo", out=tmp_path / "one", prompts=PROMPTS, job_id="j",
                           images="copy")
    data = yaml.safe_load((tmp_path / "one" / "data.yaml").read_text())
    assert data["train"] == data["val"] and any("only one image" in n for n in summary.notes)


def test_no_data_yaml_that_points_at_nothing(tmp_path):
    items = [done_item(0, "a.png", _doc(), image=b"png")]
    with pytest.raises(ConfigError, match="--copy-images or --link-images"):
        write_export(items, format="yolo", out=tmp_path / "bare", prompts=PROMPTS, job_id="j")
    assert not (tmp_path / "bare").exists()

    gone = [ExportItem(k, f"{k}.png", "done", _doc(), None, None, image_file=str(tmp_path / f"gone{k}.png"))
            for k in range(2)]
    with pytest.raises(DatasetError, match="no image could be written"):
        write_export(gone, format="yolo", out=tmp_path / "gone", prompts=PROMPTS, job_id="j", images="link")
    assert not (tmp_path / "gone" / "data.yaml").exists()
    assert not list((tmp_path / "gone").rglob("*.txt")), "no label without its image"

    remote = [ExportItem(0, "a.png", "done", _doc(), None, lambda: b"png", image_file=None)]
    with pytest.raises(ConfigError, match="directory store"):
        write_export(remote, format="yolo", out=tmp_path / "remote", prompts=PROMPTS, job_id="j", images="link")

    (tmp_path / "real.png").write_bytes(b"png")
    mixed = [ExportItem(0, "kept.png", "done", _doc(), None, None, image_file=str(tmp_path / "real.png")),
             ExportItem(1, "lost.png", "done", _doc(), None, None, image_file=str(tmp_path / "missing.png"))]
    summary = write_export(mixed, format="yolo", out=tmp_path / "mixed", prompts=PROMPTS, job_id="j",
                           images="link", val_fraction=0)
    assert (summary.written, summary.skipped) == (1, 1) and any("lost.png: left out" in n for n in summary.notes)
    assert _files(tmp_path / "mixed" / "labels") == ["train/kept.txt"]


def test_yolo_refuses_a_folder_that_holds_an_export(tmp_path):
    items = [done_item(0, "a.png", _doc(), image=b"png")]
    write_export(items, format="yolo", out=tmp_path, prompts=PROMPTS, job_id="j", images="copy")
    with pytest.raises(ConfigError, match="not empty"):
        write_export(items, format="yolo", out=tmp_path, prompts=PROMPTS, job_id="j", images="copy")


def test_a_folder_named_images_in_a_name_keeps_images_and_labels_paired(tmp_path):
    items = [done_item(0, "images/a.png", _doc(), image=b"1"), done_item(1, "b/images/c.png", _doc(), image=b"2")]
    summary = write_export(items, format="yolo", out=tmp_path, prompts=PROMPTS, job_id="j", images="copy",
                           val_fraction=0)
    assert _files(tmp_path / "images") == ["train/b/images_/c.png", "train/images_/a.png"]
    assert _files(tmp_path / "labels") == ["train/b/images_/c.txt", "train/images_/a.txt"]
    assert sum("images_" in n for n in summary.notes) == 2


@pytest.mark.parametrize("format", ["yolo", "coco"])
def test_min_score_leaves_out_whole_uncertain_images(tmp_path, format):
    """An image with any answer under --min-score is left out whole; confident ones and explicit "not found"
    stay (a correct rejection is a good background example)."""
    masks = disc(H, W, 30, 40, 12)[None]
    items = [done_item(0, "sure.png", v2_doc(masks, PROMPTS, {"circle": [(0, 0.9)]}), image=b"1"),
             done_item(1, "doubt.png", v2_doc(masks, PROMPTS, {"circle": [(0, 0.9)], "ring": [(0, 0.21)]}),
                       image=b"2"),
             done_item(2, "none.png", v2_doc(masks, PROMPTS, {"circle": [], "ring": []}), image=b"3")]
    options = {"images": "copy", "val_fraction": 0} if format == "yolo" else {}
    out = tmp_path / ("y" if format == "yolo" else "c.json")
    summary = write_export(items, format=format, out=out, prompts=PROMPTS, job_id="j", min_score=0.5, **options)
    assert (summary.written, summary.skipped, summary.uncertain, summary.instances) == (2, 1, 1, 1)
    if format == "yolo":
        assert _files(out / "images") == ["train/none.png", "train/sure.png"]
        assert (out / "labels" / "train" / "none.txt").read_text() == ""
    else:
        coco = json.loads(out.read_text())
        assert [i["file_name"] for i in coco["images"]] == ["sure.png", "none.png"]
        assert [a["score"] for a in coco["annotations"]] == [0.9]


def test_options_that_do_not_apply_are_refused(tmp_path):
    items = [done_item(0, "a.png", _doc(), image=b"png")]
    for format, options, text in [("jsonl", {"min_score": 0.3}, "--min-score applies"),
                                  ("coco", {"images": "copy"}, "yolo only"),
                                  ("polygons", {"val_fraction": 0.2}, "--val-fraction / --seed"),
                                  ("yolo", {"images": "copy", "val_fraction": 1.0}, r"\[0, 1\)")]:
        with pytest.raises(ConfigError, match=text):
            write_export(items, format=format, out=tmp_path / format, prompts=PROMPTS, job_id="j", **options)
