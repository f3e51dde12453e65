"""``slip compare`` in process on ``slip data synth --coco`` data: the bundled synth pair scores far above the
tiny-random pair, compare.json holds every figure, the page renders in headless Chromium, and every bad
configuration or truth file is one line before any model loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from browser import chromium
from slip.cli.compare import compare
from slip.data.synth import generate_dataset

SYNTH = "synth=sam=synth,clip=synth"
TINY = "tiny=sam=tiny-random,clip=tiny-random,points_per_side=4,filters=none"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_dataset(root, classes=3, per_class=2, size=128, seed=5, coco=True)
    return root


def run(*args: str):
    import typer

    app = typer.Typer()
    app.command()(compare)
    app.command("noop")(lambda: None)  # a second command keeps `compare` a sub-command, as in slip
    return CliRunner().invoke(app, ["compare", *args])


def test_the_synth_pair_scores_far_above_tiny_random_and_the_page_renders(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("SLIP_THREADS", "1")
    out = tmp_path / "out"
    result = run(str(dataset), "--truth", str(dataset / "instances.coco.json"), "--config", SYNTH, "--config", TINY,
                 "--out", str(out), "--device", "cpu", "--examples", "3", "--job-size", "1000", "--workers", "4")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "compare.json").read_text())
    assert report["images"] == 6 and report["prompts"] == ["circle", "square", "triangle"]
    synth, tiny = report["configs"]
    assert synth["ap"] >= 0.5 and synth["ap"] > tiny["ap"] + 0.4
    assert synth["f1"] >= 0.5 and synth["f1"] > tiny["f1"] + 0.4
    assert synth["counts"]["pairs"] == 18  # every prompt on every image, absent categories included
    assert synth["seconds_p90"] >= synth["seconds_p50"] > 0
    assert synth["projected_hours"] == pytest.approx(1000 * synth["seconds_p50"] / 4 / 3600)
    assert synth["request"]["sam"]["arch"] == "synth-sam" and len(synth["request"]["sam"]["sha256"]) == 64
    page = (out / "index.html").as_uri()
    dom = chromium("--dump-dom", page).stdout
    for text in ("synth", "tiny", "AP50", "truth: circle", "sam=synth,clip=synth"):
        assert text in dom, text
    shot = tmp_path / "shot.png"
    chromium(f"--screenshot={shot}", "--window-size=1200,900", page)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.std() > 20  # tables and example images, not a blank page
    assert len(list((out / "examples").glob("*.png"))) == 3 * 3  # truth + 2 configs, 3 examples


@pytest.mark.parametrize("config, words", [
    ("nameonly", "expected NAME=SPEC"),
    ("a=sam=vit_b,colour=red", "unknown key 'colour'"),
    ("a=sam=vit_b,clip", "is not key=value"),
    ("a=engine=sam4,sam=vit_b", "engine"),
    ("a=engine=sam3,sam=tiny-random-sam3,points_per_side=8", "--points-per-side"),
    ("a=sam=tiny-random,propose=animal", "--propose"),
    ("a=sam=tiny-random,instances=some", "instances"),
])
def test_a_bad_config_is_one_line_before_any_work(dataset, tmp_path, config, words):
    result = run(str(dataset), "--truth", str(dataset / "instances.coco.json"), "--config", config, "--out",
                 str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result.output
    assert not (tmp_path / "out").exists()


def test_duplicate_names_are_refused(dataset, tmp_path):
    result = run(str(dataset), "--truth", str(dataset / "instances.coco.json"), "--config", "a=sam=synth",
                 "--config", "a=sam=tiny-random", "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "must differ" in result.output


@pytest.mark.parametrize("case", ["no-matching-category", "not-coco", "missing", "no-image-in-truth"])
def test_a_bad_truth_file_is_one_line(dataset, tmp_path, case):
    truth = dataset / "instances.coco.json"
    images = str(dataset)
    extra: list[str] = []
    if case == "no-matching-category":
        extra = ["--prompt", "giraffe"]
    elif case == "not-coco":
        truth = tmp_path / "bad.json"
        truth.write_text(json.dumps({"images": []}))
    elif case == "missing":
        truth = tmp_path / "nowhere.json"
    else:
        other = tmp_path / "other"
        other.mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(other / "x.png")
        images = str(other)
    result = run(images, "--truth", str(truth), "--config", SYNTH, "--out", str(tmp_path / "out"), *extra)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    if case == "no-matching-category":
        assert "match none of the prompts" in lines[0] and "giraffe" in lines[0]


def roboflow_truth(source, path):
    """A truth (the synth set's, or its folder's) as Roboflow exports it: a category 0 named after the dataset,
    the supercategory of every class, used by no annotation."""
    source = source / "instances.coco.json" if source.is_dir() else source
    data = json.loads(source.read_text())
    data["categories"] = [{"id": 0, "name": "shapes-xyz", "supercategory": "none"}] + [
        {**c, "supercategory": "shapes-xyz"} for c in data["categories"]]
    path.write_text(json.dumps(data))
    return [c["name"] for c in data["categories"][1:]]


def test_a_roboflow_dataset_category_is_not_a_prompt(dataset, tmp_path):
    from slip.compare import load_truth
    from slip.inputs import expand_paths

    classes = roboflow_truth(dataset, tmp_path / "_annotations.coco.json")
    files = expand_paths([str(dataset)])
    truth = load_truth(tmp_path / "_annotations.coco.json", files)
    assert list(truth.prompts) == classes and truth.groups == ("shapes-xyz",)
    asked = load_truth(tmp_path / "_annotations.coco.json", files, prompts=["shapes-xyz"])
    assert asked.prompts == ("shapes-xyz",) and asked.groups == ()  # named, it is queried
    plain = load_truth(dataset / "instances.coco.json", files)
    assert list(plain.prompts) == classes and plain.groups == ()  # "shape", the classes' supercategory, is no category


def boxes_only(dataset, path, *, keep_masks: int = 0):
    """The synth truth as a detection dataset exports it: boxes, empty segmentations (but the first
    ``keep_masks`` annotations', which keep a mask and no box)."""
    data = json.loads((dataset / "instances.coco.json").read_text())
    for ann in data["annotations"][keep_masks:]:
        ann["segmentation"] = []
    for ann in data["annotations"][:keep_masks]:
        del ann["bbox"]
    path.write_text(json.dumps(data))
    return len(data["annotations"]) - keep_masks


def oracle_answers(truth):
    """Each image answered with its true objects (every prompt's own, similarity 1 for it and 0 for the others):
    the answers a perfect engine gives, for a golden score."""
    import torch

    from slip.types import MaskSet, Match, Proposals, SlipResult

    for image_id, _ in truth.images:
        anns = truth.coco.loadAnns(truth.coco.getAnnIds(imgIds=[image_id]))
        info = truth.coco.imgs[image_id]
        masks = torch.from_numpy(np.stack([truth.coco.annToMask(a).astype(bool) for a in anns]))
        n = len(anns)
        segments = MaskSet(masks=masks, boxes=torch.zeros(n, 4), predicted_iou=torch.ones(n),
                           stability_score=torch.ones(n), point_coords=torch.zeros(n, 2), crop_boxes=torch.zeros(n, 4))
        similarity = torch.tensor([[float(a["category_id"] == c) for c in truth.category_ids] for a in anns])
        matches = tuple(Match(prompt=p, best=None, threshold=0.5, top_k=(),
                              instances=tuple((i, 1.0) for i, a in enumerate(anns) if a["category_id"] == c))
                        for p, c in zip(truth.prompts, truth.category_ids))
        result = SlipResult((info["height"], info["width"]), Proposals(segments, (), n), similarity, matches)
        yield image_id, result, 0.1


@pytest.mark.parametrize("shape", ["mask", "box"])
def test_perfect_answers_score_one_on_masks_and_on_boxes(dataset, tmp_path, shape):
    from slip.compare import load_truth, score_answers
    from slip.inputs import expand_paths

    truth_file = dataset / "instances.coco.json"
    if shape == "box":
        boxes_only(dataset, truth_file := tmp_path / "boxes.json")
    files = expand_paths([str(dataset)])
    truth = load_truth(truth_file, files)
    assert truth.shape == shape
    masks = load_truth(dataset / "instances.coco.json", files)  # the answers: true masks
    score, _ = score_answers(oracle_answers(masks), truth, job_size=10, workers=1, name="oracle", spec="-",
                             positive_only=False)
    assert score.ap == pytest.approx(1.0) and score.ap50 == pytest.approx(1.0), score
    assert score.f1 == 1.0 and score.presence_accuracy == 1.0 and score.counts["pairs"] == 18, score


def test_a_roboflow_detection_export_is_scored_on_boxes_without_its_group(dataset, tmp_path, monkeypatch):
    """Roboflow's object-detection export through the command: its category 0 not queried, boxes for all but
    one annotation (which keeps a mask and no box), each said on the command line, in compare.json, on the page."""
    monkeypatch.setenv("SLIP_THREADS", "1")
    boxed = boxes_only(dataset, tmp_path / "boxes.json", keep_masks=1)
    classes = roboflow_truth(tmp_path / "boxes.json", tmp_path / "_annotations.coco.json")
    out = tmp_path / "out"
    result = run(str(dataset), "--truth", str(tmp_path / "_annotations.coco.json"), "--config", SYNTH,
                 "--out", str(out), "--examples", "1")
    assert result.exit_code == 0, result.output
    assert "6 images, 3 prompts" in result.output and "not queried: 'shapes-xyz'" in result.output, result.output
    assert "image/s" not in result.output and "/6 [" not in result.output  # the per-image bar: on terminals only
    assert f"boxes only ({boxed} annotations without a segmentation): scored on boxes" in result.output
    report = json.loads((out / "compare.json").read_text())
    assert report["prompts"] == classes and report["scored_on"] == "boxes", report
    assert report["configs"][0]["ap50"] >= 0.5, report["configs"]
    assert "scored on boxes" in (out / "index.html").read_text()


def test_an_annotation_with_neither_mask_nor_box_is_one_line(dataset, tmp_path):
    data = json.loads((dataset / "instances.coco.json").read_text())
    data["annotations"][2].update(segmentation=[], bbox=[])
    (tmp_path / "bad.json").write_text(json.dumps(data))
    result = run(str(dataset), "--truth", str(tmp_path / "bad.json"), "--config", SYNTH, "--out", str(tmp_path / "o"))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    ann = data["annotations"][2]
    assert lines == [f"error: {tmp_path / 'bad.json'}: annotation {ann['id']} (image {ann['image_id']}) has neither a "
                     "segmentation nor a bbox [x, y, width, height]"], result.output
    assert not (tmp_path / "o").exists()


def test_a_label_studio_coco_export_matches_its_images(dataset, tmp_path):
    """Label Studio's COCO export: every image in images/, named <hash>-<upload name>, file_name "images/...":
    matched whether the export's folder or its images/ folder is given."""
    import shutil

    from slip.compare import load_truth
    from slip.inputs import expand_paths

    data = json.loads((dataset / "instances.coco.json").read_text())
    (tmp_path / "export" / "images").mkdir(parents=True)
    for k, image in enumerate(data["images"]):
        name = f"{k:08x}-{image['file_name'].replace('/', '_')}"
        shutil.copy(dataset / image["file_name"], tmp_path / "export" / "images" / name)
        image["file_name"] = f"images/{name}"
    (tmp_path / "export" / "result.json").write_text(json.dumps(data))
    for images in ("export", "export/images"):
        truth = load_truth(tmp_path / "export" / "result.json", expand_paths([str(tmp_path / images)]))
        found = {image_id: path.name for image_id, path in truth.images}
        assert found == {i["id"]: i["file_name"].removeprefix("images/") for i in data["images"]}, found
