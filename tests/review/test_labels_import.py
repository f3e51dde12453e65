"""``slip labels import``: reviewed exports (Label Studio, CVAT, COCO) become the ranker's training folder,
and every malformed, foreign or mismatched export is one line naming the file, with nothing imported.

The reviewed exports are built the way the tools write them: our own pre-annotation export with a
reviewer's annotation added per task (Label Studio's JSON export keeps the task's data, its predictions
and its annotations), the CVAT file with shapes edited, a COCO file of the truth.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from producer.exports_cvat import write_cvat
from producer.exports_items import Tally
from producer.exports_labelstudio import brush_rle, write_label_studio
from producer.review_cli import labels_app
from slip.data.folder import scan_folder
from slip.review import read_labels


def run(*args: str):
    return CliRunner().invoke(labels_app, ["import", *map(str, args)])


def brush(label: str, mask: np.ndarray) -> dict:
    h, w = mask.shape
    return {"type": "brushlabels", "from_name": "brush", "to_name": "image", "original_width": w,
            "original_height": h, "value": {"format": "rle", "rle": brush_rle(mask), "brushlabels": [label]}}


def reviewed_ls_export(job, path: Path) -> dict[str, dict[str, np.ndarray]]:
    """Our tasks with a reviewer's work: image 0 kept as the truth, image 1 relabelled and one object
    deleted, image 2 skipped (cancelled), images 3-4 never opened. Returns what the reviewer said."""
    write_label_studio(job.items, out=path, prompts=job.prompts, job_id="J1", tally=Tally())
    tasks = json.loads(path.read_text())
    said = {}
    truth0 = job.truth[0]
    tasks[0]["annotations"] = [{"id": 1, "completed_by": 7, "was_cancelled": False, "updated_at": "2026-01-01T10:00",
                                "result": [brush(p, m) for p, m in truth0.items()]}]
    said[tasks[0]["data"]["slip_name"]] = truth0
    (first, mask), _ = list(job.truth[1].items())
    relabel = "circle" if first != "circle" else "square"
    tasks[1]["annotations"] = [
        {"id": 2, "completed_by": 7, "was_cancelled": False, "updated_at": "2026-01-01T10:00", "result": []},
        {"id": 3, "completed_by": 8, "was_cancelled": False, "updated_at": "2026-01-02T10:00",  # the latest counts
         "result": [brush(relabel, mask)]}]
    said[tasks[1]["data"]["slip_name"]] = {relabel: mask}
    tasks[2]["annotations"] = [{"id": 4, "was_cancelled": True, "result": [brush("circle", mask)]}]
    for k, task in enumerate(tasks):
        task["id"] = 100 + k
    path.write_text(json.dumps(tasks))
    return said


def test_label_studio_corrections_become_the_training_set(review_job, tmp_path):
    export = tmp_path / "export.json"
    said = reviewed_ls_export(review_job, export)
    out = tmp_path / "labels"
    result = run(export, "--from", "label-studio", "--out", out, "--images", review_job.root, "--heldout", "0",
                 *[a for p in review_job.prompts for a in ("-p", p)])
    assert result.exit_code == 0, result.output
    assert "imported 2 reviewed image(s) (3 not reviewed" in result.output
    labels = read_labels(out)
    assert [i["name"] for i in labels.items] == list(said) and labels.review["source"] == "label-studio"
    assert labels.review["unreviewed"] == 3 and [i["annotator"] for i in labels.items] == ["7", "8"]
    for item in labels.items:  # COCO instances hold exactly what the reviewer said
        truth = labels.truth(item)
        for prompt in review_job.prompts:
            expected = said[item["name"]].get(prompt, np.zeros_like(truth[prompt]))
            assert np.array_equal(truth[prompt], expected), (item["name"], prompt)
    folder = scan_folder(out)  # the ranker's training format, as slip train-ranker reads it
    counts = {name: sum(r.label == c for r in folder.records) for c, name in enumerate(folder.class_names)}
    expected = {}
    for objects in said.values():
        for prompt in objects:
            expected[prompt] = expected.get(prompt, 0) + 1
    assert {k: v for k, v in counts.items() if v} == expected
    assert folder.has_masks and set(folder.class_names) <= set(review_job.prompts)


def test_heldout_images_stay_out_of_the_training_folder(review_job, tmp_path):
    export = tmp_path / "truth.coco.json"
    coco_export(review_job, export)
    out = tmp_path / "labels"
    result = run(export, "--from", "coco", "--out", out, "--images", review_job.root, "--heldout", "0.4",
                 *[a for p in review_job.prompts for a in ("-p", p)])
    assert result.exit_code == 0, result.output
    labels = read_labels(out)
    heldout = {i["name"] for i in labels.split("heldout")}
    assert len(heldout) == 2 and len(labels.split("train")) == 3
    trained = {Path(r.path).name.split("-", 1)[1].rsplit("-", 1)[0] for r in scan_folder(out).records}
    assert trained.isdisjoint({Path(n).stem for n in heldout})


def test_cvat_review_imports_edited_masks(review_job, tmp_path):
    export = tmp_path / "annotations.xml"
    write_cvat(review_job.items, out=export, prompts=review_job.prompts, job_id="J1", tally=Tally())
    out = tmp_path / "labels"
    result = run(export, "--from", "cvat", "--out", out, "--images", review_job.root,
                 *[a for p in review_job.prompts for a in ("-p", p)])
    assert result.exit_code == 0, result.output
    labels = read_labels(out)
    assert len(labels.items) == 5  # every image of a CVAT file counts as reviewed
    item = next(i for i in labels.items if i["name"] == review_job.items[0].name)
    from producer.exports_items import answers

    ours = {a.prompt: a.instances[0].mask() for a in answers(review_job.items[0].doc, review_job.prompts) if a.instances}
    truth = labels.truth(item)
    assert all(np.array_equal(truth[p], m) for p, m in ours.items())


def nested_job(review_job, root: Path, folders: list[str]):
    """The review job's images filed into class folders (``folders[k]/img_k.png``), as a folder job."""
    import shutil

    for k, item in enumerate(review_job.items[:len(folders)]):
        (root / folders[k]).mkdir(parents=True, exist_ok=True)
        shutil.copy(review_job.root / item.name, root / folders[k] / item.name)
    return root


def test_images_named_as_the_tool_wrote_them_are_the_jobs(review_job, tmp_path):
    """A tool that kept only the file name (the job's are in class folders), or put its own folder or a server
    path in front: each image is the job's item whose name ends so; the labels use the job's names."""
    folders = ["circles", "squares", "circles", "stars", "stars"]
    root = nested_job(review_job, tmp_path / "job", folders)
    export = tmp_path / "truth.json"
    written = dict(zip([i.name for i in review_job.items], ["img_0.png", "images/img_1.png",
                                                            "C:\\export\\circles\\img_2.png", "/data/upload/3/img_3.png",
                                                            "stars/img_4.png"]))
    coco_export(review_job, export, names=written)
    result = run(export, "--from", "coco", "--out", tmp_path / "labels", "--images", root,
                 *[a for p in review_job.prompts for a in ("-p", p)])
    assert result.exit_code == 0, result.output
    names = sorted(i["name"] for i in read_labels(tmp_path / "labels").items)
    assert names == sorted(f"{f}/img_{k}.png" for k, f in enumerate(folders)), names


def test_bad_a_file_name_two_images_of_the_job_end_with(review_job, tmp_path):
    root = nested_job(review_job, tmp_path / "job", ["circles", "squares", "stars", "stars", "stars"])
    (root / "squares" / "img_0.png").write_bytes((root / "circles" / "img_0.png").read_bytes())  # img_0.png twice
    export = tmp_path / "truth.json"
    coco_export(review_job, export)  # file names without folders
    out = tmp_path / "labels"
    result = run(export, "--from", "coco", "--out", out, "--images", root,
                 *[a for p in review_job.prompts for a in ("-p", p)])
    assert result.exit_code == 2 and "1 reviewed image(s) are not in the image folder" in result.output, result.output
    assert "'img_0.png'" in result.output and not out.exists()


def coco_export(job, path: Path, *, names=None, label=None) -> None:
    from slip.review import rle_of

    images, annotations = [], []
    for k, (item, truth) in enumerate(zip(job.items, job.truth)):
        images.append({"id": k + 1, "file_name": (names or {}).get(item.name, item.name), "width": 96, "height": 96})
        for prompt, mask in truth.items():
            annotations.append({"id": len(annotations) + 1, "image_id": k + 1, "iscrowd": 0,
                                "category_id": job.prompts.index(prompt) + 1, "segmentation": rle_of(mask)})
    categories = [{"id": c + 1, "name": label if (label and c == 0) else p} for c, p in enumerate(job.prompts)]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))


# --- bad input: one line naming the file and the problem, nothing imported -----------------------------


def _bad(review_job, tmp_path, export: Path, source: str, pattern: str) -> None:
    out = tmp_path / "labels"
    result = run(export, "--from", source, "--out", out, "--images", review_job.root,
                 *[a for p in review_job.prompts for a in ("-p", p)])
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line and str(export) in line and re.search(pattern, line), line
    assert not out.exists() and not any(p.name.startswith(".labels") for p in tmp_path.iterdir())


def test_bad_malformed_json(review_job, tmp_path):
    export = tmp_path / "export.json"
    reviewed_ls_export(review_job, export)
    export.write_text(export.read_text()[:-200])
    _bad(review_job, tmp_path, export, "label-studio", "not valid JSON")


def test_bad_wrong_tool_cvat_file_as_label_studio(review_job, tmp_path):
    export = tmp_path / "annotations.xml"
    write_cvat(review_job.items, out=export, prompts=review_job.prompts, job_id="J1", tally=Tally())
    _bad(review_job, tmp_path, export, "label-studio", "is XML.*use --from cvat")


def test_bad_wrong_tool_coco_as_label_studio_and_back(review_job, tmp_path):
    coco = tmp_path / "truth.json"
    coco_export(review_job, coco)
    _bad(review_job, tmp_path, coco, "label-studio", "COCO file.*use --from coco")
    ls = tmp_path / "export.json"
    reviewed_ls_export(review_job, ls)
    _bad(review_job, tmp_path, ls, "coco", "use --from label-studio")
    _bad(review_job, tmp_path, ls, "cvat", "JSON, not CVAT XML")


def test_bad_foreign_label_studio_tasks(review_job, tmp_path):
    export = tmp_path / "export.json"
    export.write_text(json.dumps([{"id": 1, "data": {"image": "x.png"}, "annotations": [{"id": 1, "result": []}]}]))
    _bad(review_job, tmp_path, export, "label-studio", "task 1 has no data.slip_name")


def test_bad_images_not_in_the_job(review_job, tmp_path):
    export = tmp_path / "truth.json"
    coco_export(review_job, export, names={review_job.items[2].name: "elsewhere/other.png"})
    _bad(review_job, tmp_path, export, "coco", "1 reviewed image.*not in the image folder.*'elsewhere/other.png'")


def test_bad_labels_that_are_not_prompts(review_job, tmp_path):
    export = tmp_path / "truth.json"
    coco_export(review_job, export, label="dog")
    _bad(review_job, tmp_path, export, "coco", "label 'dog' .* is not a prompt")


def test_bad_empty_review(review_job, tmp_path):
    export = tmp_path / "export.json"
    write_label_studio(review_job.items, out=export, prompts=review_job.prompts, job_id="J1", tally=Tally())
    _bad(review_job, tmp_path, export, "label-studio", "no reviewed item \\(5 not reviewed\\)")


def test_bad_image_of_another_size(review_job, tmp_path):
    export = tmp_path / "annotations.xml"
    write_cvat(review_job.items[:1], out=export, prompts=review_job.prompts, job_id="J1", tally=Tally())
    export.write_text(export.read_text().replace('width="96" height="96"', 'width="128" height="96"'))
    _bad(review_job, tmp_path, export, "cvat", "img_0.png is 128x96 in the export but 96x96 in the image folder")


def test_bad_not_cvat_xml(review_job, tmp_path):
    export = tmp_path / "voc.xml"
    export.write_text("<annotation><filename>a.png</filename></annotation>")
    _bad(review_job, tmp_path, export, "cvat", "not a 'CVAT for images 1.1' file")


def test_out_folder_not_empty_is_refused(review_job, tmp_path):
    export = tmp_path / "truth.json"
    coco_export(review_job, export)
    out = tmp_path / "labels"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run(export, "--from", "coco", "--out", out, "--images", review_job.root,
                 *[a for p in review_job.prompts for a in ("-p", p)])
    assert result.exit_code == 2 and "is not empty" in result.output and (out / "keep.txt").read_text() == "mine"


def test_reviewed_before_names_both_splits_from_a_review_folder_or_its_labels(review_job, tmp_path):
    """``slip review --skip-reviewed``: the images an earlier round reviewed, train and held-out alike."""
    from producer.labels import reviewed_before

    export = tmp_path / "truth.coco.json"
    coco_export(review_job, export, names={})
    labels = tmp_path / "round1" / "labels"
    result = run(export, "--from", "coco", "--out", labels, "--images", review_job.root, "--heldout", "0.4",
                 *[a for p in review_job.prompts for a in ("-p", p)])
    assert result.exit_code == 0, result.output
    names = {i["name"] for i in read_labels(labels).items}
    assert len(names) == 5 and {i["split"] for i in read_labels(labels).items} == {"train", "heldout"}
    assert reviewed_before([tmp_path / "round1"]) == reviewed_before([labels]) == names
    assert reviewed_before([]) == frozenset()


def test_bad_skip_reviewed_folder_without_a_review(tmp_path):
    """A folder that holds no earlier review is one line naming it, before the job is even read (no such job
    here, no store either)."""
    from producer.cli import build_app

    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        result = CliRunner().invoke(build_app(), ["review", "20990101-000000-abcdef", "--out", str(tmp_path / "out"),
                                                  "--skip-reviewed", str(folder)],
                                    env={"SLIP_STORE": str(tmp_path / "no-store")})
        assert result.exit_code == 2, result.output
        line = result.output.strip()
        assert "\n" not in line and line.startswith(f"error: {folder} holds no earlier review"), line
        assert not (tmp_path / "out").exists() and not (tmp_path / "no-store").exists()


def test_bad_skip_reviewed_with_corrections(tmp_path):
    """--skip-reviewed shapes an export; with --corrections (learning) it would mean nothing: one line."""
    from producer.cli import build_app

    (tmp_path / "export.json").write_text("[]")
    result = CliRunner().invoke(build_app(), ["review", "20990101-000000-abcdef", "--out", str(tmp_path / "out"),
                                              "--corrections", str(tmp_path / "export.json"), "--skip-reviewed",
                                              str(tmp_path)], env={"SLIP_STORE": str(tmp_path / "no-store")})
    assert result.exit_code == 2 and result.output.strip() == ("error: --skip-reviewed leaves images out of an export: "
                                                               "give it without --corrections"), result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "no-store").exists()
