"""Learning from a review: the labels folder keeps the job's proposals, a ranker is scored and calibrated
on the reviewed images, and ``slip train-ranker --init`` fine-tunes the current ranker on the crops (from
its weights, with the loss it was trained with), giving a ranker that loads everywhere."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from producer.labels import JobImages, import_labels
from slip.review import read_labels, score_reviewed


@pytest.fixture(scope="module")
def labels(review_job, tmp_path_factory):
    """The truth of every image imported as a review of the job (its segments.json documents kept)."""
    import numpy as np

    from slip.review import rle_of

    work = tmp_path_factory.mktemp("learn")
    images, annotations = [], []
    for k, (item, truth) in enumerate(zip(review_job.items, review_job.truth)):
        images.append({"id": k + 1, "file_name": item.name, "width": 96, "height": 96})
        for prompt, mask in truth.items():
            annotations.append({"id": len(annotations) + 1, "image_id": k + 1, "iscrowd": 0,
                                "category_id": review_job.prompts.index(prompt) + 1, "segmentation": rle_of(mask)})
    export = work / "truth.json"
    export.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [
        {"id": c + 1, "name": p} for c, p in enumerate(review_job.prompts)]}))
    job = JobImages("J18", review_job.prompts, lambda: iter(review_job.items))
    out, reviewed, _ = import_labels(export, source="coco", out=work / "labels", job=job, heldout=0.4)
    assert reviewed == 5 and np.all([i["proposals"] for i in read_labels(out).items])
    return out


def test_rejected_proposals_become_background_crops(labels, review_job):
    from slip.data.folder import scan_folder

    folder = scan_folder(labels)
    assert folder.class_names[-1] == "background"
    background = [r for r in folder.records if r.label == len(folder.class_names) - 1]
    # each image's segments: its 2 objects (kept), a background blob and a half object (rejected unless
    # the half overlaps its object by IoU > 0.5)
    from slip.outputs import decode_rle

    expected = {"train": 0, "heldout": 0}
    for item in read_labels(labels).items:
        doc = review_job.items[item["index"]].doc
        masks = decode_rle([seg["segmentation"] for seg in doc["segments"]], 96, 96)
        kept = list(review_job.truth[item["index"]].values())
        expected[item["split"]] += sum(m.any() and all((m & k).sum() / (m | k).sum() <= 0.5 for k in kept)
                                       for m in masks)
    assert len(background) == expected["train"] > 0 and all(r.mask_path is not None for r in background)
    assert len(list((labels / ".heldout" / "_background").glob("*-n?.png"))) == expected["heldout"]


def test_a_ranker_is_scored_and_calibrated_on_the_reviewed_images(labels):
    from slip.review import calibrate_reviewed
    from slip.rankers.loading import load_ranker

    folder = read_labels(labels)
    score = score_reviewed(load_ranker("synth", device="cpu"), folder, split="all")
    assert score.images == 5 and score.queries == 10 and 0 <= score.correct <= 10
    assert len(score.probes) == 5 * 3 and sum(p.present for p in score.probes) == 10
    calibration = calibrate_reviewed(labels, "synth", device="cpu")
    assert -1 <= calibration.point.threshold <= 1
    assert calibration.record["split"] == "train" and calibration.record["heldout"]["split"] == "heldout"
    assert calibration.record["reviewed_labels"] == str(labels) and calibration.record["job"] == "J18"


def test_train_ranker_init_fine_tunes_the_current_ranker(labels, tmp_path):
    from producer.cli import build_app
    from slip.calibrate import save_calibration
    from slip.review import calibrate_reviewed
    from slip.rankers.loading import load_ranker_bundle

    out = tmp_path / "ranker"
    result = CliRunner().invoke(build_app(), ["train-ranker", str(labels), "--init", "synth", "--out", str(out),
                                              "--epochs", "2", "--batch-size", "4", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "config.json").read_text())
    assert meta["init"] == {"from": "synth"} and meta["training"]["config"]["loss"] == "clip"  # the synth ranker's loss
    assert meta["training"]["classes"] == ["circle", "square", "triangle", "background"]  # + rejected proposals
    save_calibration(calibrate_reviewed(labels, str(out), device="cpu"))
    bundle = load_ranker_bundle(str(out), device="cpu")  # loads with its new threshold.json, like --clip OUT
    assert bundle.threshold is not None and bundle.ref.sha256 != load_ranker_bundle("synth", device="cpu").ref.sha256
    assert score_reviewed(bundle.ranker, read_labels(labels), split="heldout").images == 2


def test_labels_without_proposals_cannot_be_scored(review_job, tmp_path):
    from slip.errors import DatasetError

    export = tmp_path / "truth.json"
    export.write_text(json.dumps({"images": [{"id": 1, "file_name": review_job.items[0].name, "width": 96,
                                              "height": 96}], "annotations": [], "categories": []}))
    from producer.labels import folder_images

    out, _, _ = import_labels(export, source="coco", out=tmp_path / "labels",
                              job=folder_images(review_job.root, review_job.prompts), heldout=0)
    from slip.rankers.loading import load_ranker

    with pytest.raises(DatasetError, match="import with --job"):
        score_reviewed(load_ranker("synth", device="cpu"), read_labels(out), split="all")


def test_labels_calibrate_writes_the_threshold_beside_a_ranker(labels, tmp_path):
    import shutil

    from producer.review_cli import labels_app
    from slip.threshold import read_threshold
    from slip.weights import bundled_path

    ranker = tmp_path / "ranker"
    shutil.copytree(bundled_path("synth-clip"), ranker)
    (ranker / "threshold.json").unlink()
    result = CliRunner().invoke(labels_app, ["calibrate", str(labels), "--ranker", str(ranker), "--write",
                                             "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "on the heldout images: precision" in result.output and read_threshold(ranker) is not None
    refused = CliRunner().invoke(labels_app, ["calibrate", str(labels), "--ranker", "synth", "--write"])
    assert refused.exit_code == 2 and "bundled inside the slip package" in refused.output
