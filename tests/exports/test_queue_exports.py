"""Exports over a real worker's results: `slip data synth --coco`, `slip submit segment` to a real
`celery -A worker worker` (the bundled synth models), then `slip results` and `slip gallery` as a user runs
them — COCOeval scores the coco-results export, the YOLO labels read back, the gallery page names every
prompt."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "queue"))
from queue_helpers import job_id_from, queue_env, require_redis, run_cli, start_worker, stop_worker, wait_worker_ready  # noqa: E402
from ultralytics_check import load_in_ultralytics  # noqa: E402
import redis_dbs  # noqa: E402

pytestmark = pytest.mark.integration
DB = redis_dbs.EXPORTS
CLASSES = 3


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    """Six synthetic images of three classes segmented through the queue with the bundled models."""
    from queue_helpers import flush

    require_redis()
    flush(DB)
    root = tmp_path_factory.mktemp("synth")
    env = queue_env(tmp_path_factory.mktemp("store"), db=DB, SLIP_SAM="synth", SLIP_CLIP="synth")
    made = run_cli(["data", "synth", "--out", str(root / "data"), "--classes", str(CLASSES), "--per-class", "2",
                    "--size", "96", "--seed", "5", "--coco"], env)
    assert made.returncode == 0, made.stderr
    log = tmp_path_factory.mktemp("logs") / "w.log"
    worker = start_worker(env, ("gpu", "cpu"), "exports", log_path=log)
    try:
        wait_worker_ready(env, "exports", process=worker)
        classes = sorted(p.name for p in (root / "data").iterdir() if p.is_dir())
        prompts = [a for name in classes for a in ("--prompt", name.replace("_", " "))]
        proc = run_cli(["submit", "segment", str(root / "data" / "*" / "?????.png"), *prompts, "--wait",
                        "--no-threshold"], env)
        assert proc.returncode == 0, proc.stdout + proc.stderr + log.read_text()[-3000:]
    finally:
        stop_worker(worker)
    yield {"env": env, "job": job_id_from(proc.stdout), "truth": root / "data" / "instances.coco.json",
           "out": tmp_path_factory.mktemp("out"), "prompts": [p for p in prompts if p != "--prompt"]}
    flush(DB)


def _segm_ap(truth: Path, results: Path, *, shift: int = 0) -> float:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(truth))
        detections = json.loads(results.read_text())
        ids = sorted(gt.getCatIds())
        for d in detections:  # shift > 0: every detection's category moved to the next one (a wrong answer)
            d["category_id"] = ids[(ids.index(d["category_id"]) + shift) % len(ids)]
        evaluator = COCOeval(gt, gt.loadRes(detections), "segm")
        evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
    return float(evaluator.stats[0])


def test_cocoeval_scores_a_real_workers_results(job):
    out = job["out"] / "dt.json"
    proc = run_cli(["results", job["job"], "--format", "coco-results", "--image-ids-from", str(job["truth"]),
                    "--out", str(out)], job["env"])
    assert proc.returncode == 0, proc.stderr
    assert "wrote 6 images" in proc.stdout, proc.stdout
    right, wrong = _segm_ap(job["truth"], out), _segm_ap(job["truth"], out, shift=1)
    assert right > wrong + 0.25, (right, wrong)


@pytest.mark.parametrize("mode", ["--copy-images", "--link-images"])
def test_yolo_export_is_a_dataset_ultralytics_loads(job, mode):
    """``--link-images`` needs ``ExportItem.image_file`` from ``QueueClient.export_items`` (docs/CONTRACTS.md)."""
    out = job["out"] / f"yolo{mode}"
    proc = run_cli(["results", job["job"], "--format", "yolo", "--out", str(out), mode, "--val-fraction", "0.3"],
                   job["env"])
    assert proc.returncode == 0, proc.stderr
    loaded = load_in_ultralytics(out / "data.yaml", job["out"] / f"yolo-config{mode}")
    assert list(loaded["names"].values()) == job["prompts"]
    train, val = loaded["train"]["images"], loaded["val"]["images"]
    assert train and val and not set(train) & set(val) and len(train) + len(val) == 6
    assert loaded["train"]["instances"] + loaded["val"]["instances"] > 0
    labels = sorted((out / "labels").rglob("*.txt"))
    assert len(labels) == 6
    rows = [line.split() for path in labels for line in path.read_text().splitlines()]
    assert rows and all(int(r[0]) < CLASSES and len(r) >= 7 and len(r) % 2 == 1 for r in rows)
    coords = np.array([float(v) for r in rows for v in r[1:]])
    assert ((coords >= 0) & (coords <= 1)).all()


def test_gallery_page_names_every_prompt(job):
    out = job["out"] / "gallery"
    proc = run_cli(["gallery", job["job"], "--out", str(out), "--truth", str(job["truth"])], job["env"])
    assert proc.returncode == 0, proc.stderr
    page = (out / "index.html").read_text()
    assert all(prompt in page for prompt in job["prompts"])
    assert len(list((out / "thumbs").iterdir())) == 6
