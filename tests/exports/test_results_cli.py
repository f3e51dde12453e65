"""``slip results`` / ``slip gallery`` command functions on a tiny typer app, over real pipeline results."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import typer
from pycocotools.coco import COCO
from typer.testing import CliRunner

import producer.results_cli as results_cli
from producer.exports import answers
from producer.results_cli import JobExport, gallery, results

app = typer.Typer()
app.command("results")(results)
app.command("gallery")(gallery)


@pytest.fixture()
def job(synth_run, monkeypatch) -> JobExport:
    """The job as the ledger would hand it over (QueueClient.export_items is the lead's; until it lands the
    command reads these real results)."""
    source = JobExport("20260101-000000-abcdef", synth_run.prompts, "SAM synth, ranker synth", synth_run.items,
                       lambda: [i.name for i in synth_run.items])
    monkeypatch.setattr(results_cli, "open_job", lambda job_id: source if job_id == source.job_id else None)
    return source


def _run(*args: str):
    return CliRunner().invoke(app, list(args))


def _one_line_error(run, text: str) -> None:
    assert run.exit_code == 2, run.output
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], run.stderr


@pytest.mark.parametrize("format, name, extra", [("coco", "r.coco.json", []), ("jsonl", "r.jsonl", []),
                                                 ("polygons", "p.jsonl", []), ("yolo", "yolo", ["--copy-images"]),
                                                 ("yolo", "linked", ["--link-images", "--val-fraction", "0.5"])])
def test_results_writes_each_format(job, tmp_path, format, name, extra):
    out = tmp_path / name
    run = _run("results", job.job_id, "--format", format, "--out", str(out), *extra)
    assert run.exit_code == 0, run.output
    assert "wrote 6 images" in run.stdout and str(out) in run.stdout
    assert out.exists()


def test_results_for_cocoeval_with_the_ground_truth_ids(job, synth_run, tmp_path):
    out = tmp_path / "dt.json"
    run = _run("results", job.job_id, "-f", "coco-results", "-o", str(out), "--image-ids-from", str(synth_run.truth))
    assert run.exit_code == 0, run.output
    with contextlib.redirect_stdout(io.StringIO()):
        dt = COCO(str(synth_run.truth)).loadRes(str(out))
    gt_ids = {i["file_name"]: i["id"] for i in json.loads(synth_run.truth.read_text())["images"]}
    assert {a["image_id"] for a in dt.anns.values()} == set(gt_ids.values())


def label_studio_truth(synth_run, path):
    """The synth truth as labelling tools write it: the export's images/ folder in front, or (odd ids) only the
    file name, which every class folder of the synth set shares."""
    data = json.loads(synth_run.truth.read_text())
    for image in data["images"]:
        image["file_name"] = image["file_name"].split("/")[-1] if image["id"] % 2 else "images/" + image["file_name"]
    path.write_text(json.dumps(data))
    return data


def test_a_truth_written_as_a_labelling_tool_writes_it_keeps_its_ids(job, synth_run, tmp_path):
    """file_names with the export's folder in front, some without the class folder: the ids go to the images
    whose names end so; a file name that several images end with matches none of them."""
    data = label_studio_truth(synth_run, tmp_path / "gt.json")
    out = tmp_path / "dt.json"
    run = _run("results", job.job_id, "-f", "coco-results", "-o", str(out),
               "--image-ids-from", str(tmp_path / "gt.json"))
    assert run.exit_code == 0, run.output
    names = [i.name for i in synth_run.items if i.state == "done"]
    expected = {}
    for image in data["images"]:
        tail = image["file_name"].removeprefix("images/")
        owners = [n for n in names if n == tail or n.endswith("/" + tail)]  # the synth items all match a name
        if len(owners) == 1:
            expected[owners[0]] = image["id"]
    assert 0 < len(expected) < len(data["images"])  # basenames shared by two class folders match nothing
    written = {a["image_id"] for a in json.loads(out.read_text())}
    assert written == set(expected.values()), (written, expected)
    page = tmp_path / "g"
    run = _run("gallery", job.job_id, "--out", str(page), "--truth", str(tmp_path / "gt.json"))
    assert run.exit_code == 0, run.output
    assert "objects present:" in (page / "index.html").read_text()


def test_results_user_errors_are_one_line(job, synth_run, tmp_path):
    _one_line_error(_run("results", job.job_id, "-f", "voc", "-o", str(tmp_path / "x")), "unknown --format 'voc'")
    _one_line_error(_run("results", job.job_id, "-f", "jsonl", "-o", str(tmp_path / "x"), "--image-ids-from",
                         str(synth_run.truth)), "coco-results only")
    _one_line_error(_run("results", job.job_id, "-f", "coco", "-o", str(tmp_path / "x"), "--copy-images"),
                    "yolo only")
    _one_line_error(_run("results", job.job_id, "-f", "yolo", "-o", str(tmp_path / "y")),
                    "needs --copy-images or --link-images")
    assert not (tmp_path / "y").exists()
    _one_line_error(_run("results", job.job_id, "-f", "yolo", "-o", str(tmp_path / "y"), "--copy-images",
                         "--link-images"), "exclude each other")
    _one_line_error(_run("results", job.job_id, "-f", "jsonl", "-o", str(tmp_path / "x"), "--min-score", "0.3"),
                    "--min-score applies to --format coco and yolo only")
    _one_line_error(_run("results", job.job_id, "-f", "coco", "-o", str(tmp_path / "x"), "--val-fraction", "0.2"),
                    "--val-fraction / --seed apply to --format yolo only")
    _one_line_error(_run("results", job.job_id, "-f", "coco-results", "-o", str(tmp_path / "x"),
                         "--image-ids-from", str(tmp_path / "nope.json")), "cannot read the ground truth")
    (tmp_path / "file").write_text("")
    _one_line_error(_run("results", job.job_id, "-f", "coco", "-o", str(tmp_path / "file" / "x.json")), "cannot write")


def test_unknown_job_is_one_line_from_the_real_store(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIP_STORE", str(tmp_path / "store"))
    (tmp_path / "store").mkdir()
    _one_line_error(_run("results", "20260101-000000-ffffff", "-o", str(tmp_path / "r.jsonl")), "no job")
    _one_line_error(_run("gallery", "20260101-000000-ffffff", "-o", str(tmp_path / "g")), "no job")
    _one_line_error(_run("results", "../etc", "-o", str(tmp_path / "r.jsonl")), "not a job id")


def test_results_min_score_reports_the_images_left_out(job, tmp_path):
    scores = sorted(i.score for item in job.items for a in answers(item.doc, job.prompts) for i in a.instances)
    cut = scores[len(scores) // 2]  # about half the images hold an answer under it
    expected = sum(any(i.score < cut for a in answers(item.doc, job.prompts) for i in a.instances)
                   for item in job.items)
    assert 0 < expected < len(job.items)
    run = _run("results", job.job_id, "-f", "coco", "-o", str(tmp_path / "c.json"), "--min-score", str(cut))
    assert run.exit_code == 0, run.output
    assert f"wrote {len(job.items) - expected} images" in run.stdout
    assert f"{expected} images left out: an answer scored under --min-score" in run.stdout


def test_gallery_command_with_truth(job, synth_run, tmp_path):
    out = tmp_path / "g"
    run = _run("gallery", job.job_id, "--out", str(out), "--truth", str(synth_run.truth), "--limit", "4")
    assert run.exit_code == 0, run.output
    page = (out / "index.html").read_text()
    assert page.count("<figure") == 4 and job.job_id in page and "SAM synth, ranker synth" in page
    assert "objects present:" in page and "correctly not found" in page
    _one_line_error(_run("gallery", job.job_id, "--out", str(out), "--truth", str(tmp_path / "none.json")),
                    "cannot read the ground truth")


def test_gallery_judges_answers_by_their_boxes_against_a_truth_of_boxes(job, synth_run, tmp_path):
    """Detection labels (boxes, no segmentations): each answer's box against the true box, the IoU on the page
    the boxes' (pycocotools' box IoU, computed here on its own)."""
    from pycocotools import mask as mask_utils

    data = json.loads(synth_run.truth.read_text())
    for ann in data["annotations"]:
        ann["segmentation"] = []
    (tmp_path / "boxes.json").write_text(json.dumps(data))
    out = tmp_path / "g"
    run = _run("gallery", job.job_id, "--out", str(out), "--truth", str(tmp_path / "boxes.json"), "--limit", "4")
    assert run.exit_code == 0, run.output
    page = (out / "index.html").read_text()
    assert "Judged on boxes: the truth has boxes only." in page and "objects present:" in page
    ids = {i["file_name"]: i["id"] for i in data["images"]}
    names = {c["id"]: c["name"] for c in data["categories"]}
    checked = 0
    for item in [i for i in synth_run.items if i.state == "done"][:4]:
        true = {names[a["category_id"]]: a["bbox"] for a in data["annotations"] if a["image_id"] == ids[item.name]}
        for answer in answers(item.doc, job.prompts):
            if answer.prompt in true and len(answer.instances) == 1:  # one answer, one true box: the boxes' IoU
                iou = mask_utils.iou([answer.instances[0].bbox()], [true[answer.prompt]], [0])[0][0]
                assert f"IoU {iou:.2f}" in page, (item.name, answer.prompt, iou)
                checked += 1
    assert checked >= 3


def test_a_real_job_that_has_not_run_yet(synth_run, tmp_path, monkeypatch):
    """The real path: a job written into a directory store by QueueClient.create_job (nothing sent), read
    back through open_job / QueueClient.export_items: every image is pending, so nothing is written."""
    from producer.common import client_from_env

    monkeypatch.setenv("SLIP_STORE", str(tmp_path / "store"))
    images = [synth_run.root / item.name for item in synth_run.items]
    manifest = client_from_env().create_job(images, synth_run.prompts, sam="synth", clip="synth")
    run = _run("results", manifest.job_id, "-f", "jsonl", "-o", str(tmp_path / "r.jsonl"))
    assert run.exit_code == 0, run.output
    assert "wrote 0 images, 0 instances (jsonl), 6 skipped" in run.stdout
    assert (tmp_path / "r.jsonl").read_text() == ""
    run = _run("gallery", manifest.job_id, "-o", str(tmp_path / "g"))
    assert run.exit_code == 0, run.output
    page = (tmp_path / "g" / "index.html").read_text()
    assert "6 not finished" in page and "SAM synth, ranker synth" in page
