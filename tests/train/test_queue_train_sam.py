"""SAM training through the real queue: Redis db 9, one real Celery worker process, the ``slip`` CLI.

A tiny-random SAM is trained for seconds on a tiny synthetic mask folder (and on a COCO file that lives
outside its image directory); the checkpoint must land in the store, load with ``slip.sam.load_sam`` and
carry on from where it stopped when a second job starts from ``job:<id>``. Bad requests fail once, with
the reason, and leave nothing queued.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "queue"))
from queue_helpers import (  # noqa: E402
    invoke_cli,
    job_id_from,
    module_worker,
)

from slip.data.synth import generate_dataset, render_object  # noqa: E402
from slip.sam import SAM_ARCHS, load_sam  # noqa: E402
from slip.train.sam import arch_of  # noqa: E402
import redis_dbs  # noqa: E402

DB = redis_dbs.TRAIN_SAM
FAST = ["--epochs", "2", "--scenes-per-epoch", "8", "--batch-images", "4", "--prompts-per-image", "4",
        "--val-scenes", "4", "--val-fraction", "0.25"]
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sam_worker(tmp_path_factory):
    with module_worker(tmp_path_factory, db=DB, name="sam-trainer") as worker:
        yield worker


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """3 classes x 4 images of 32 px, with masks."""
    return generate_dataset(tmp_path_factory.mktemp("sam-synth") / "ds", classes=3, per_class=4, size=32, seed=0)


def _run(args, env):
    done = invoke_cli(args, env)
    assert done.exit_code == 0, done.output
    return done.stdout


def _summary(store: Path, job: str) -> dict:
    return json.loads((store / "jobs" / job / "result.json").read_text())


def _coco(root: Path) -> tuple[Path, Path]:
    """4 images of 64x48 px with one RLE-annotated object each; the annotation file beside the images."""
    rng = np.random.default_rng(3)
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for i, name in enumerate(["circle", "star", "fish", "house"]):
        canvas = np.full((48, 64, 3), 30 + 40 * i, np.uint8)
        blob, mask = render_object(name, rng, 32)
        canvas[8:40, 16:48][mask] = blob[mask]
        full = np.zeros((48, 64), bool)
        full[8:40, 16:48] = mask
        Image.fromarray(canvas).save(root / "images" / f"{i}.png")
        rle = mask_utils.encode(np.asfortranarray(full.astype(np.uint8)))
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": 48, "width": 64})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0, "area": float(full.sum()),
                            "bbox": [16, 8, 32, 32], "segmentation": {**rle, "counts": rle["counts"].decode("ascii")}})
    ann = root / "annotations" / "instances.json"
    ann.parent.mkdir()
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "x"}]}))
    return root / "images", ann


def test_train_sam_job_stores_a_loadable_checkpoint_and_a_second_job_continues_it(sam_worker, dataset, tmp_path):
    env, store = sam_worker["env"], sam_worker["store"]
    copy = tmp_path / "sam-copy"
    out = _run(["submit", "train-sam", str(dataset), "--arch", "tiny-random", *FAST, "--wait", "--out", str(copy)], env)
    job = job_id_from(out)
    summary = _summary(store, job)
    # the summary: every epoch, the best one, where the checkpoint is
    assert summary["epochs"] == 2 and [h["epoch"] for h in summary["history"]] == [0, 1, 2]
    assert all("train_loss" in h for h in summary["history"][1:])
    best = max(summary["history"][1:], key=lambda h: h["val_miou"])
    assert summary["best_epoch"] == best["epoch"] and summary["best_val_miou"] == best["val_miou"]
    assert 0.0 <= summary["best_val_miou"] <= 1.0 and summary["arch"] == "tiny-random"
    assert summary["store_prefix"] == f"models/sam/{job}" and summary["worker"].startswith("sam-trainer@")
    assert f"{summary['best_val_miou']:.4f}" in out and f"models/sam/{job}" in out and f"job:{job}" in out
    # the checkpoint directory in the store, and its copy
    stored = store / "models" / "sam" / job
    assert {"sam.pth", "config.json", "curve.json", "curve.png", "training.json"} <= {p.name for p in stored.iterdir()}
    assert sorted(summary["files"]) == sorted(p.name for p in stored.iterdir())
    assert json.loads((stored / "curve.json").read_text())["epochs"] == summary["history"]
    sam = load_sam(str(copy), device="cpu")
    assert arch_of(sam) == SAM_ARCHS["tiny-random"]
    in_store = load_sam(str(stored), device="cpu").state_dict()
    assert all(torch.equal(v, in_store[k]) for k, v in sam.state_dict().items())
    # a second job fine-tunes the first one's checkpoint: its starting point is the first one's best epoch
    out = _run(["submit", "train-sam", str(dataset), "--sam", f"job:{job}", *FAST, "--epochs", "1", "--wait"], env)
    second = _summary(store, job_id_from(out))
    assert second["request"]["sam"] == f"store:models/sam/{job}" and second["arch"] == "tiny-random"
    assert second["start_val_miou"] == pytest.approx(summary["best_val_miou"], abs=1e-5)


def test_coco_file_outside_the_image_directory_travels_with_the_upload(sam_worker, tmp_path):
    env, store = sam_worker["env"], sam_worker["store"]
    images, ann = _coco(tmp_path / "coco")
    out = _run(["submit", "train-sam", str(images), "--coco", str(ann), "--sam", "tiny-random", *FAST,
                "--epochs", "1", "--batch-images", "2", "--wait"], env)
    summary = _summary(store, job_id_from(out))
    assert summary["request"]["coco"] == "_coco/annotations.json" and summary["best_epoch"] == 1
    manifest = json.loads((store / "datasets" / summary["request"]["dataset"] / "manifest.json").read_text())
    assert sorted(f["path"] for f in manifest["files"]) == ["0.png", "1.png", "2.png", "3.png", "_coco/annotations.json"]
    assert (store / "models" / "sam" / summary["job_id"] / "sam.pth").is_file()


def test_bad_options_fail_before_anything_is_uploaded(sam_worker, dataset):
    env, store = sam_worker["env"], sam_worker["store"]
    before = sorted(p.relative_to(store) for p in store.rglob("*"))
    for args, message in [(["--sam", "tiny-random", "--arch", "tiny-random"], "exactly one"),
                          ([], "exactly one"),
                          (["--arch", "vit_z"], "unknown SAM architecture"),
                          (["--arch", "tiny-random", "--epochs", "0"], "epochs"),
                          (["--sam", "job:nope"], "has no checkpoint")]:
        done = invoke_cli(["submit", "train-sam", str(dataset), *args], env)
        assert done.exit_code == 2, (args, done.output)
        assert message in done.stderr and "Traceback" not in done.output and done.stderr.count("\n") == 1
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == before


def test_bad_requests_fail_once_on_the_worker_with_the_reason(sam_worker):
    """Requests no CLI would send (a job written by another client) fail on the worker with the reason, for
    good: not queued again, not held, not run twice."""
    from jobs.status import chunk_records
    from queue_helpers import client_for

    client = client_for(sam_worker["env"])
    job = "20240101-000000-badsam"
    base = {"job_id": job, "dataset": "0" * 64, "epochs": 1}
    requests = [{**base, "sam": "tiny-random", "arch": "tiny-random"}, {**base, "arch": "tiny-random"},
                {**base, "arch": "tiny-random", "lr_schedule": "x"}]
    client.submit("train-sam", {}, requests, job_id=job, names=["both", "missing dataset", "unknown field"])
    status = client.wait(job, timeout_s=60, poll_s=0.5)
    assert status.counts["failed"] == 3 and status.retryable == 0, status.summary()
    expected = {0: ("ConfigError", "exactly one"), 1: ("DatasetError", "is not in store"),
                2: ("ConfigError", "lr_schedule")}
    records = list(chunk_records(client.store, job))
    for record in records:
        (outcome,) = record.items
        kind, text = expected[outcome.index]
        assert record.attempt == 0 and outcome.permanent, record
        assert outcome.error == kind and text in outcome.reason, outcome
    time.sleep(1.0)  # nothing comes back: not queued again, not held, not retried
    assert client.queue_depths()["gpu"] == 0 and not client.board.view(job).running
    log = sam_worker["log"].read_text(errors="replace")
    for chunk in range(3):
        assert log.count(f"slip.train_sam[{job}.{chunk}.0] received") == 1 and f"{job}.{chunk}.1" not in log


def test_progress_is_reported_per_epoch(sam_worker, dataset):
    from jobs.broker import task_id
    from queue_helpers import client_for

    env, store = sam_worker["env"], sam_worker["store"]
    job = job_id_from(_run(["submit", "train-sam", str(dataset), "--arch", "tiny-random", *FAST, "--epochs", "5"], env))
    client = client_for(env)
    unit = task_id(job, 0, 0)  # the job's one unit, first attempt
    seen, notes, deadline = [], [], time.monotonic() + 60
    meta = client.app.backend.get_task_meta(unit)  # state and info in one read: apart, they can straddle the end
    while meta["status"] not in ("SUCCESS", "FAILURE") and time.monotonic() < deadline:
        if meta["status"] == "PROGRESS" and isinstance(meta["result"], dict):
            seen.append(meta["result"])
            notes += client.progress_notes(job)  # what `slip status --watch` words: the same records
        time.sleep(0.02)
        meta = client.app.backend.get_task_meta(unit)
    assert meta["status"] == "SUCCESS", meta["result"]
    assert seen and all(i["job_id"] == job and i["epochs"] == 5 and 1 <= i["epoch"] <= 5 for i in seen)
    assert notes and all(n["job_id"] == job and 1 <= n["epoch"] <= 5 for n in notes)  # never the unit's summary
    history = _summary(store, job)["history"]
    assert all(i["val_miou"] == history[i["epoch"]]["val_miou"] for i in seen)
    assert client.status(job).counts["done"] == 1  # followed like any job
