"""``slip review`` through the real queue: a job segmented by a real worker (the bundled synth models), its
most doubtful images exported for Label Studio, a review (the truth, as a reviewer would draw it) brought
back, the ranker fine-tuned and calibrated, and the job re-answered with the new ranker by the same worker
(``slip submit segment --from-job``: the new ranker uploaded to the store and loaded on demand) — from the
cached proposals (no SAM work), under the new ranker's keys, the old results kept."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "queue"))
from queue_helpers import (client_for, flush, job_id_from, queue_env, require_redis, run_cli, start_worker,  # noqa: E402
                           stop_worker, wait_worker_ready)

from producer.exports_labelstudio import brush_rle  # noqa: E402
import redis_dbs  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]
DB = redis_dbs.REVIEW
IMAGES = "data/*/?????.png"  # relative to the work folder: the *.mask.png files are not images


def _reviewed(tasks: list[dict], truth: dict) -> list[dict]:
    """Every exported task reviewed: the true objects drawn as brush masks (Label Studio's JSON export)."""
    names = {c["id"]: c["name"] for c in truth["categories"]}
    by_file = {i["file_name"]: i["id"] for i in truth["images"]}
    for k, task in enumerate(tasks):
        image = by_file[task["data"]["slip_name"]]
        result = []
        for ann in (a for a in truth["annotations"] if a["image_id"] == image):
            mask = mask_utils.decode({"size": ann["segmentation"]["size"],
                                      "counts": ann["segmentation"]["counts"].encode()}).astype(bool)
            h, w = mask.shape
            result.append({"type": "brushlabels", "from_name": "brush", "to_name": "image", "original_width": w,
                           "original_height": h, "value": {"format": "rle", "rle": brush_rle(mask),
                                                           "brushlabels": [names[ann["category_id"]]]}})
        task.update(id=k + 1, annotations=[{"id": k + 1, "completed_by": 1, "result": result, "was_cancelled": False}])
    return tasks


def test_review_loop_through_the_queue(tmp_path):
    require_redis()
    flush(DB)
    env = queue_env(tmp_path / "store", db=DB, SLIP_SAM="synth", SLIP_CLIP="synth")
    made = run_cli(["data", "synth", "--out", str(tmp_path / "data"), "--classes", "3", "--per-class", "3",
                    "--size", "96", "--seed", "5", "--coco"], env)
    assert made.returncode == 0, made.stderr
    truth = json.loads((tmp_path / "data" / "instances.coco.json").read_text())
    prompts = [c["name"] for c in truth["categories"]]
    images = str(tmp_path / IMAGES)
    worker = start_worker(env, ("gpu", "cpu"), "review-a", log_path=tmp_path / "a.log")
    try:
        wait_worker_ready(env, "review-a", process=worker)
        first = run_cli(["submit", "segment", images, *[a for p in prompts for a in ("-p", p)], "--wait"], env)
        assert first.returncode == 0, first.stdout + first.stderr
        job = job_id_from(first.stdout)
        # 1. the most doubtful images, as Label Studio tasks
        out = tmp_path / "review"
        exported = run_cli(["review", job, "--out", str(out), "--limit", "6"], env)
        assert exported.returncode == 0, exported.stderr
        tasks = json.loads((out / "review.label-studio.json").read_text())
        assert len(tasks) == 6 and "label_config.xml" in exported.stdout
        assert all(0 <= t["predictions"][0]["score"] <= 1 for t in tasks)
        # the same order through slip results and slip gallery
        cvat = run_cli(["results", job, "--format", "cvat", "--order", "doubt", "--limit", "3", "--out",
                        str(tmp_path / "review.xml")], env)
        assert cvat.returncode == 0, cvat.stderr
        names = [line.split('name="')[1].split('"')[0] for line in (tmp_path / "review.xml").read_text().splitlines()
                 if line.startswith("<image ")]
        assert names == [t["data"]["slip_name"] for t in tasks[:3]]
        page = run_cli(["gallery", job, "--order", "doubt", "--limit", "2", "--out", str(tmp_path / "gallery")], env)
        assert page.returncode == 0, page.stderr
        html = (tmp_path / "gallery" / "index.html").read_text()
        assert html.index(tasks[0]["data"]["slip_name"]) < html.index(tasks[1]["data"]["slip_name"])
        assert tasks[2]["data"]["slip_name"] not in html
        old_files = {p: p.read_bytes() for p in (tmp_path / "store" / "results").rglob("segments.json")}
        # 2. the review comes back: import, fine-tune, calibrate, re-answer with the new ranker (same worker)
        export = tmp_path / "export.json"
        export.write_text(json.dumps(_reviewed(tasks, truth)))
        learnt = run_cli(["review", job, "--out", str(out), "--corrections", str(export), "--epochs", "2",
                          "--device", "cpu"], env)
        assert learnt.returncode == 0, learnt.stdout + learnt.stderr
        assert "object-level accuracy on the heldout reviewed images" in learnt.stdout
        ranker = out / "ranker"
        assert (ranker / "threshold.json").is_file() and (out / "labels" / "review.json").is_file()
        second = learnt.stdout.strip().splitlines()[-1].split(" as job ")[1].split()[0]
        waited = run_cli(["wait", second], env)
        assert waited.returncode == 0, waited.stdout + waited.stderr + (tmp_path / "a.log").read_text()[-3000:]
    finally:
        stop_worker(worker)
    client = client_for(env)
    assert client.jobs(kind="segment")[0].job_id == second
    old = {i.name: i.doc for i in client.export_items(job)}
    new = {i.name: i.doc for i in client.export_items(second)}
    assert set(new) == set(old) and all(d is not None for d in new.values())
    for name, doc in new.items():
        assert doc["runtime"]["proposals"] == "cached"  # segment once, query many: SAM did not run again
        assert not {"sam", "encode", "decode", "filters"} & set(doc["timings_s"]), doc["timings_s"]
        assert doc["request_digest"] != old[name]["request_digest"]  # the new ranker keys the new results
        assert doc["request"]["ranker"]["sha256"] != old[name]["request"]["ranker"]["sha256"]
        assert doc["request"]["ranker"]["spec"].startswith("store:rankers/")  # uploaded, loaded on demand
        assert doc["request"]["threshold"] == json.loads((ranker / "threshold.json").read_text())["threshold"]
        assert np.array_equal([s["segmentation"]["counts"] for s in doc["segments"]],
                              [s["segmentation"]["counts"] for s in old[name]["segments"]])
    assert all(p.read_bytes() == data for p, data in old_files.items()), "the old results stay as they were"
    # 3. the next round, on the re-answered job: the most doubtful of the images nobody reviewed yet
    round2 = run_cli(["review", second, "--out", str(tmp_path / "round2"), "--limit", "6", "--skip-reviewed", str(out)],
                     env)
    assert round2.returncode == 0, round2.stdout + round2.stderr
    assert "(6 reviewed before left out)" in round2.stdout and "warning" not in round2.stderr
    names = [t["data"]["slip_name"] for t in json.loads((tmp_path / "round2" / "review.label-studio.json").read_text())]
    assert len(names) == len(truth["images"]) - 6 == 3
    assert set(names).isdisjoint(t["data"]["slip_name"] for t in tasks)
    # a review of other images: nothing to leave out, said in a warning
    foreign = json.loads((out / "labels" / "review.json").read_text())
    foreign["items"] = [{**i, "name": f"elsewhere/{i['name']}"} for i in foreign["items"]]
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "review.json").write_text(json.dumps(foreign))
    other = run_cli(["review", second, "--out", str(tmp_path / "round2b"), "--limit", "6", "--skip-reviewed",
                     str(tmp_path / "foreign")], env)
    assert other.returncode == 0, other.stdout + other.stderr
    assert f"warning: none of the 6 images reviewed in {tmp_path / 'foreign'} is an image of job {second}" in other.stderr
    assert len(json.loads((tmp_path / "round2b" / "review.label-studio.json").read_text())) == 6
    flush(DB)
