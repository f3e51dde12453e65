"""End to end through the real CLI, a real Redis and a real `celery -A worker worker` process."""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis
from PIL import Image
from pycocotools.coco import COCO

from slip.errors import SlipError
from slip.outputs import decode_rle
from worker.jobs import SegmentRequest
from worker.ledger import IN_FLIGHT, task_records, task_states

from queue_helpers import TINY_CLI_ARGS, TINY_PARAMS, invoke_cli, job_id_from, make_images, run_cli

pytestmark = pytest.mark.integration
PROMPTS = ("a red box", "a blue disc")
RESULT_FILES = ["mask_0.png", "mask_1.png", "overlay_0.png", "overlay_1.png", "segments.json"]


@pytest.fixture(scope="module")
def batch(worker, tmp_path_factory) -> dict:
    """22 images submitted with `slip submit segment DIR --prompt ... --prompt ... --wait`."""
    folder = tmp_path_factory.mktemp("batch")
    paths = make_images(folder, 22)
    proc = run_cli(["submit", "segment", str(folder), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--wait",
                    "--batch-size", "3", "--max-in-flight", "4", *TINY_CLI_ARGS], worker["env"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"folder": folder, "paths": paths, "job": job_id_from(proc.stdout), "stdout": proc.stdout}


def store_root(worker) -> Path:
    return Path(worker["env"]["SLIP_STORE"])


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_health_reports_models_loaded_in_the_pool_process(worker):
    health = worker["health"]
    assert health["models_loaded"] and health["sam"] == "tiny-random" and health["clip"] == "tiny-random"
    assert health["device"] == "cpu" and health["dtype"] == "fp32" and health["memory"]["rss_bytes"] > 10_000_000
    assert health["pid"] != worker["process"].pid, "models must load in the forked pool process, not the parent"
    assert set(health["queues"]) >= {"gpu", "cpu"}


def test_every_result_is_present_and_valid(batch, client, worker):
    assert f"22 images: 22 done, 0 failed, 0 pending, 0 lost" in batch["stdout"]
    status = client.status(batch["job"])
    assert status.counts == {"done": 22, "failed": 0, "pending": 0, "lost": 0}
    root = store_root(worker)
    matched = 0
    for item in status.items:
        folder = root / item.result_key
        assert sorted(os.listdir(folder)) == RESULT_FILES, "exactly one copy of each file, no temp files"
        width, height = Image.open(item.name).size
        for name in RESULT_FILES[:-1]:
            assert Image.open(folder / name).size == (width, height), name
        doc = json.loads((folder / "segments.json").read_text())
        assert doc["image_size"] == {"height": height, "width": width} and doc["prompts"] == list(PROMPTS)
        masks = decode_rle([s["segmentation"] for s in doc["segments"]], height, width)
        assert masks.shape == (len(doc["segments"]), height, width)
        assert [int(m.sum()) for m in masks] == [s["area"] for s in doc["segments"]]
        for i, match in enumerate(doc["matches"]):
            png = np.asarray(Image.open(folder / f"mask_{i}.png")) > 0
            expected = masks[match["segment"]] if match["segment"] is not None else np.zeros((height, width), bool)
            assert np.array_equal(png, expected)
            matched += match["segment"] is not None
    assert matched > 0, "the tiny-random settings must produce segments, or this test checks nothing"


def test_results_coco_jsonl_and_status_through_the_cli(batch, worker, client, tmp_path):
    out = tmp_path / "coco.json"
    proc = invoke_cli(["results", batch["job"], "--format", "coco", "--out", str(out)], worker["env"])
    assert proc.exit_code == 0, proc.stderr
    coco = COCO(str(out))
    assert len(coco.getImgIds()) == 22
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(PROMPTS)
    anns = coco.loadAnns(coco.getAnnIds())
    assert anns, "matched segments become annotations"
    for ann in anns:
        img = coco.loadImgs(ann["image_id"])[0]
        mask = coco.annToMask(ann)
        assert mask.shape == (img["height"], img["width"]) and int(mask.sum()) == ann["area"]
        assert -1.0 <= ann["score"] <= 1.0
    proc = invoke_cli(["results", batch["job"], "--format", "jsonl"], worker["env"])
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(records) == 22 and all(r["state"] == "done" and len(r["matches"]) == 2 for r in records)
    proc = invoke_cli(["status", batch["job"], "--json"], worker["env"])
    summary = {"job_id": batch["job"], "total": 22, "done": 22, "failed": 0, "pending": 0, "lost": 0}
    assert json.loads(proc.stdout) == summary
    assert client.app.send_task("slip.reconcile", args=[batch["job"]]).get(timeout=60) == summary  # the cpu task


def test_resubmit_skips_done_work(batch, worker, client):
    before = snapshot(store_root(worker) / "results")
    proc = run_cli(["submit", "segment", str(batch["folder"]), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                    "--wait", *TINY_CLI_ARGS], worker["env"])
    assert proc.returncode == 0, proc.stderr
    job = job_id_from(proc.stdout)
    assert job != batch["job"]
    assert client.status(job).counts["done"] == 22
    assert task_records(client.store, job) == [], "nothing was enqueued: every result existed"
    assert snapshot(store_root(worker) / "results") == before, "no result was rewritten"


def test_redelivered_task_writes_one_result(worker, client, tmp_path):
    manifest = client.create_job(make_images(tmp_path, 1, seed=7), ["a red box"], TINY_PARAMS)
    request = SegmentRequest(job_id=manifest.job_id, items=manifest.items, spec=manifest.spec).model_dump(mode="json")
    task_id = str(uuid.uuid4())
    client.app.send_task("slip.segment", kwargs={"request": request}, task_id=task_id).get(timeout=120)
    item = manifest.items[0]
    result_dir = store_root(worker) / manifest.spec.result_key(item)
    proposals_dir = store_root(worker) / "proposals" / item.image_sha
    first = (snapshot(result_dir), snapshot(proposals_dir))
    # the broker delivers the same message again (as after a worker loss); a later task marks the end
    client.app.send_task("slip.segment", kwargs={"request": request}, task_id=task_id)
    marker = client.create_job(make_images(tmp_path / "m", 1, seed=8), ["a red box"], TINY_PARAMS)
    marker_request = SegmentRequest(job_id=marker.job_id, items=marker.items, spec=marker.spec).model_dump(mode="json")
    client.app.send_task("slip.segment", kwargs={"request": marker_request}).get(timeout=120)
    assert (snapshot(result_dir), snapshot(proposals_dir)) == first, "the redelivery rewrote nothing"
    assert sorted(os.listdir(result_dir)) == ["mask_0.png", "overlay_0.png", "segments.json"]
    runs = re.findall(rf"slip\.segment\[{task_id}\] succeeded.*", worker["log"].read_text())
    assert len(runs) == 2 and "'status': 'done'" in runs[0] and "'status': 'skipped'" in runs[1]


def test_poison_message_is_failed_without_running(worker, client, tmp_path):
    manifest = client.create_job(make_images(tmp_path, 1, seed=9), ["a red box"], TINY_PARAMS)
    request = SegmentRequest(job_id=manifest.job_id, items=manifest.items, spec=manifest.spec).model_dump(mode="json")
    task_id = str(uuid.uuid4())
    max_deliveries = client.settings.max_deliveries
    r = redis.Redis.from_url(worker["env"]["SLIP_BROKER_URL"])
    r.set(f"slip:deliveries:{task_id}:0", max_deliveries)  # it started that often and killed its worker each time
    result = client.app.send_task("slip.segment", kwargs={"request": request}, task_id=task_id)
    with pytest.raises(SlipError, match="poison"):
        result.get(timeout=120)
    assert result.state == "FAILURE"
    item = manifest.items[0]
    error = json.loads((store_root(worker) / manifest.spec.result_key(item) / "error.json").read_text())
    assert error["reason"].startswith(f"poison: killed its worker {max_deliveries} times") and error["task_id"] == task_id
    assert not (store_root(worker) / "proposals" / item.image_sha).exists(), "the poison task did not run"


def test_lost_items_are_found_and_retried(worker, client, tmp_path):
    manifest = client.create_job(make_images(tmp_path, 3, seed=10), list(PROMPTS), TINY_PARAMS)  # producer "crashed"
    assert client.status(manifest.job_id).counts == {"done": 0, "failed": 0, "pending": 0, "lost": 3}
    assert client.retry(manifest.job_id) == 3
    status = client.wait(manifest.job_id, timeout_s=120)
    assert status.counts == {"done": 3, "failed": 0, "pending": 0, "lost": 0}
    assert {r.attempt for r in task_records(client.store, manifest.job_id)} == {1}


def test_backpressure_bounds_outstanding_tasks(worker, client, tmp_path):
    max_in_flight = 2
    observed = []
    job_holder = []

    def on_progress(_counts):
        records = task_records(client.store, job_holder[0])
        states = task_states(client.app, [r.task_id for r in records])
        observed.append(sum(states[r.task_id] in IN_FLIGHT for r in records))

    job = client.submit_segment(make_images(tmp_path, 6, seed=11), ["a red box"], TINY_PARAMS, batch_size=1,
                                max_in_flight=max_in_flight, on_job=job_holder.append, on_progress=on_progress)
    assert observed, "the producer had to wait for outstanding tasks"
    assert max(observed) <= max_in_flight
    assert len(task_records(client.store, job)) == 6
    assert client.wait(job, timeout_s=120).counts["done"] == 6


def test_transient_store_failure_retries_then_gives_up_and_slip_retry_recovers(worker, client, tmp_path):
    manifest = client.create_job(make_images(tmp_path, 1, seed=12), ["a red box"], TINY_PARAMS)
    item = manifest.items[0]
    blocker = store_root(worker) / "proposals" / item.image_sha
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_bytes(b"a file where the proposals folder must go: every write under it fails")
    client.enqueue(manifest, manifest.items, attempt=0)
    status = client.wait(manifest.job_id, timeout_s=120)
    (state,) = status.items
    assert state.state == "failed" and not state.permanent, state
    assert state.reason.startswith("gave up after 2 retries: StoreError"), state.reason
    log = worker["log"].read_text()
    assert len(re.findall(rf"slip\.segment\[{state.task_id}\] retry", log)) == 2, "retried with backoff, twice"
    blocker.unlink()
    assert client.retry(manifest.job_id) == 1
    assert client.wait(manifest.job_id, timeout_s=120).counts == {"done": 1, "failed": 0, "pending": 0, "lost": 0}
