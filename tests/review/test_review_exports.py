"""Label Studio and CVAT exports of a job, and the doubt order (no server: see test_labelstudio_roundtrip.py).

The CVAT file is read back by datumaro (CVAT's own dataset library, in the main venv) and its masks must
equal ours pixel for pixel; Label Studio brush masks go through our decoder here and through
label-studio-sdk's decoder and a real server in the round-trip test.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from producer.doubt import ordered, review_score
from producer.exports_cvat import mask_runs, runs_mask, write_cvat
from producer.exports_items import Tally, answers
from producer.exports_labelstudio import brush_mask, brush_rle, config_path, write_label_studio
from review_docs import make_doc
from slip.errors import ConfigError, DatasetError
from slip.review import DOUBT_SCALE, image_doubt, prompt_certainty


def our_masks(item, prompts) -> dict[str, list[np.ndarray]]:
    return {a.prompt: [i.mask() for i in a.instances] for a in answers(item.doc, prompts) if a.instances}


def test_label_studio_tasks_carry_predictions_with_our_masks(review_job, tmp_path):
    out = tmp_path / "tasks.json"
    tally = Tally()
    write_label_studio(review_job.items, out=out, prompts=review_job.prompts, job_id="J1", tally=tally,
                       image_base="/data/local-files/?d=photos/")
    tasks = json.loads(out.read_text())
    done = [i for i in review_job.items if i.state == "done"]
    assert len(tasks) == len(done) == tally.written and tally.skipped == 1
    config = config_path(out).read_text()
    assert all(f'<Label value="{p}"' in config for p in review_job.prompts)
    for task, item in zip(tasks, done):
        assert task["data"]["image"] == f"/data/local-files/?d=photos/{item.name}"
        assert task["data"]["slip_name"] == item.name and task["data"]["slip_job"] == "J1"
        (prediction,) = task["predictions"]
        assert prediction["model_version"] == item.doc["request_digest"]
        assert prediction["score"] == pytest.approx(review_score(item.doc, review_job.prompts))
        decoded: dict[str, list[np.ndarray]] = {}
        for result in prediction["result"]:
            assert result["type"] == "brushlabels" and result["to_name"] == "image"
            (label,) = result["value"]["brushlabels"]
            assert label in review_job.prompts and 0 < result["score"] <= 1
            decoded.setdefault(label, []).append(brush_mask(result["value"]["rle"], result["original_height"],
                                                            result["original_width"]))
        ours = our_masks(item, review_job.prompts)
        assert decoded.keys() == ours.keys()
        for label in ours:
            assert all(np.array_equal(a, b) for a, b in zip(decoded[label], ours[label]))


def test_label_studio_polygons_outline_the_masks(review_job, tmp_path):
    from producer.labels import polygon_mask

    out = tmp_path / "tasks.json"
    write_label_studio(review_job.items, out=out, prompts=review_job.prompts, job_id="J1", tally=Tally(),
                       shape="polygon")
    task = json.loads(out.read_text())[0]
    ours = our_masks(review_job.items[0], review_job.prompts)
    for result in task["predictions"][0]["result"]:
        assert result["type"] == "polygonlabels" and result["from_name"] == "polygon"
        h, w = result["original_height"], result["original_width"]
        points = np.array(result["value"]["points"]) * [w, h] / 100.0 - 0.5
        drawn = polygon_mask(points, h, w)
        truth = ours[result["value"]["polygonlabels"][0]][0]
        assert (drawn & truth).sum() / (drawn | truth).sum() > 0.9


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (64, 48), (300, 300)])
def test_brush_rle_round_trip_and_long_runs(shape):
    rng = np.random.default_rng(sum(shape))
    for mask in (rng.uniform(size=shape) < 0.3, np.zeros(shape, bool), np.ones(shape, bool)):
        assert np.array_equal(brush_mask(brush_rle(mask), *shape), mask)


def test_brush_rle_of_another_size_is_refused():
    with pytest.raises(DatasetError, match="not 4x4x4"):
        brush_mask(brush_rle(np.ones((3, 3), bool)), 4, 4)
    with pytest.raises(DatasetError, match="ends early"):
        brush_mask(brush_rle(np.eye(8, dtype=bool))[:-3], 8, 8)


def test_cvat_masks_load_in_datumaro_equal_to_ours(review_job, tmp_path):
    from datumaro.components.annotation import AnnotationType
    from datumaro.components.dataset import Dataset

    folder = tmp_path / "cvat"
    (folder / "images").mkdir(parents=True)
    for item in review_job.items:
        if item.state == "done":
            shutil.copy(review_job.root / item.name, folder / "images" / item.name)
    tally = Tally()
    write_cvat(review_job.items, out=folder / "annotations.xml", prompts=review_job.prompts, job_id="J1", tally=tally)
    dataset = Dataset.import_from(str(folder), "cvat")
    labels = dataset.categories()[AnnotationType.label]
    done = [i for i in review_job.items if i.state == "done"]
    assert len(dataset) == len(done) and tally.instances > 0
    by_id = {loaded.id: loaded for loaded in dataset}
    for item in done:
        loaded = by_id[item.name.rsplit(".", 1)[0]]
        got: dict[str, list[np.ndarray]] = {}
        for ann in loaded.annotations:
            assert ann.type == AnnotationType.mask and 0 < float(ann.attributes["score"]) <= 1
            got.setdefault(labels[ann.label].name, []).append(ann.image.astype(bool))
        ours = our_masks(item, review_job.prompts)
        assert got.keys() == ours.keys()
        for label in ours:
            assert all(np.array_equal(a, b) for a, b in zip(got[label], ours[label]))


def test_cvat_polygons_load_in_datumaro(review_job, tmp_path):
    from datumaro.components.annotation import AnnotationType
    from datumaro.components.dataset import Dataset

    folder = tmp_path / "cvat"
    (folder / "images").mkdir(parents=True)
    item = review_job.items[0]
    shutil.copy(review_job.root / item.name, folder / "images" / item.name)
    write_cvat([item], out=folder / "annotations.xml", prompts=review_job.prompts, job_id="J1", tally=Tally(),
               shape="polygon")
    (loaded,) = Dataset.import_from(str(folder), "cvat")
    polygons = [a for a in loaded.annotations if a.type == AnnotationType.polygon]
    assert len(polygons) == sum(len(a.instances) for a in answers(item.doc, review_job.prompts))


def test_cvat_runs_round_trip_and_bad_runs():
    rng = np.random.default_rng(3)
    mask = np.zeros((20, 30), bool)
    mask[4:15, 6:25] = rng.uniform(size=(11, 19)) < 0.5
    mask[4, 6] = True  # the box starts with a foreground pixel: a leading 0-length background run
    runs, box = mask_runs(mask)
    assert runs[0] == 0 and np.array_equal(runs_mask(runs, box, 20, 30), mask)
    with pytest.raises(ValueError, match="does not fit"):
        runs_mask(runs[:-1], box, 20, 30)


def _certainties(doc: dict, prompts) -> list[float]:
    """Per prompt, slip.review.prompt_certainty of the document's scores (the fixture's threshold: 0.25)."""
    similarity = np.array([[s["similarity"][p] for p in prompts] for s in doc["segments"]])
    return [prompt_certainty(similarity[:, k], 0.25) for k in range(len(prompts))]


def _expected_corrections(doc: dict, prompts) -> float:
    """The rule of slip.review written out: per prompt exp(-certainty / scale), plus per segment the soft
    'no prompt claims it' (every prompt's threshold is the fixture's 0.25)."""
    similarity = np.array([[s["similarity"][p] for p in prompts] for s in doc["segments"]])
    doubt = sum(np.exp(-c / DOUBT_SCALE) for c in _certainties(doc, prompts))
    return doubt + float((1.0 / (1.0 + np.exp((similarity - 0.25).max(1) / DOUBT_SCALE))).sum())


def test_doubt_order_puts_the_most_expected_corrections_first(review_job):
    prompts = review_job.prompts
    done = [i for i in review_job.items if i.state == "done"]
    values = [_expected_corrections(i.doc, prompts) for i in done]
    assert len(set(np.round(values, 9))) == len(values), "no ties: the order is the rule's, not the job's"
    want = [done[k].index for k in sorted(range(len(done)), key=lambda k: -values[k])]
    assert [i.index for i in ordered(review_job.items, order="doubt", prompts=prompts)] == want
    assert [i.index for i in ordered(review_job.items, order="doubt", limit=2, prompts=prompts)] == want[:2]
    assert [i.index for i in ordered(review_job.items, order="job", limit=3)] == [0, 1, 2]
    # certainties (circle, square, triangle) of image 0, from the fixture's margin 0.02 and threshold 0.25:
    # the first object's prompt 0.02 (over the half object), the second's 0.07 over the threshold, the absent 0
    assert _certainties(review_job.items[0].doc, prompts) == pytest.approx([0.02, 0.07, 0.0])
    expected = 1 + np.exp(-0.02 / DOUBT_SCALE) + np.exp(-0.07 / DOUBT_SCALE)
    assert review_score(review_job.items[0].doc, prompts) == pytest.approx(1 - expected / 3)
    with pytest.raises(ConfigError, match="--order"):
        list(ordered(review_job.items, order="size"))


def test_unclaimed_segments_count_toward_the_corrections():
    from slip.review import expected_corrections, unclaimed

    named = np.array([[0.9, 0.1], [0.1, 0.8]])  # each segment far over one prompt's threshold
    unnamed = np.array([[0.9, 0.1], [0.1, 0.8], [-0.1, 0.0], [0.0, -0.2]])  # two more far under both
    assert unclaimed(named, [0.3, 0.3]) < 0.01 and 1.99 < unclaimed(unnamed, [0.3, 0.3]) <= 2
    assert unclaimed(unnamed, [None, None]) == 0.0, "no threshold, nothing to claim by"
    assert unclaimed(unnamed, [0.3, None]) == pytest.approx(unclaimed(unnamed[:, :1], [0.3]))  # thresholded only
    assert expected_corrections(unnamed, [0.3, 0.3]) == pytest.approx(
        image_doubt(unnamed, [0.3, 0.3]) + unclaimed(unnamed, [0.3, 0.3]))


def test_a_limit_reads_once_and_gives_the_same_first_images(tmp_path):
    from producer.exports_items import ExportItem

    rng = np.random.default_rng(7)
    prompts = ("a", "b", "c", "d")
    masks = np.zeros((6, 8, 8), bool)
    for k in range(6):
        masks[k, k, :] = True
    items = [ExportItem(k, f"{k}.png", "done", make_doc(masks, rng.uniform(0, 0.6, (6, 4)), prompts, threshold=0.3,
                                                         digest="0" * 64), None, None) for k in range(60)]
    everything = [i.index for i in ordered(iter(items), order="doubt", prompts=prompts)]
    assert sorted(everything) == list(range(60))
    for limit in (1, 5, 17):
        assert [i.index for i in ordered(iter(items), order="doubt", limit=limit, prompts=prompts)] == everything[:limit]


def test_certainty_and_doubt_rules():
    assert prompt_certainty(np.array([0.5, 0.45, 0.1]), None) == pytest.approx(0.05)  # margin
    assert prompt_certainty(np.array([0.5, 0.1]), 0.48) == pytest.approx(0.02)  # just over the threshold
    assert prompt_certainty(np.array([0.3, 0.1]), 0.31) == pytest.approx(0.01)  # just under it
    assert prompt_certainty(np.array([]), 0.5) == 0.0
    assert prompt_certainty(np.array([0.9]), None) == 1.0
    sure, unsure = np.array([[0.9, 0.05], [0.1, 0.5]]), np.array([[0.31, 0.3], [0.3, 0.29]])
    assert image_doubt(sure, [None, None]) < 0.01 < 1.5 < image_doubt(unsure, [None, None]) <= 2


def test_write_export_knows_the_review_formats(review_job, tmp_path):
    from producer.exports import write_export

    common = dict(prompts=review_job.prompts, job_id="J1")
    ordered_items = ordered(review_job.items, order="doubt", limit=2, prompts=review_job.prompts)
    summary = write_export(ordered_items, format="label-studio", out=tmp_path / "t.json", image_base="https://x/",
                           shape="polygon", **common)
    assert summary.written == 2 and summary.paths == (tmp_path / "t.json", config_path(tmp_path / "t.json"))
    tasks = json.loads((tmp_path / "t.json").read_text())
    first = [i.index for i in ordered(review_job.items, order="doubt", limit=2, prompts=review_job.prompts)]
    assert [t["data"]["slip_index"] for t in tasks] == first
    assert tasks[0]["data"]["image"] == f"https://x/img_{first[0]}.png"
    summary = write_export(review_job.items, format="cvat", out=tmp_path / "a.xml", **common)
    assert summary.written == 5 and summary.skipped == 1 and summary.paths == (tmp_path / "a.xml",)
    with pytest.raises(ConfigError, match="--image-base applies to --format label-studio"):
        write_export(review_job.items, format="cvat", out=tmp_path / "b.xml", image_base="https://x/", **common)
    with pytest.raises(ConfigError, match="--shape apply to --format label-studio and cvat"):
        write_export(review_job.items, format="coco", out=tmp_path / "c.json", shape="mask", **common)
    with pytest.raises(ConfigError, match="unknown CVAT shape"):
        write_export(review_job.items, format="cvat", out=tmp_path / "d.xml", shape="brush", **common)
    assert not (tmp_path / "d.xml").exists()
