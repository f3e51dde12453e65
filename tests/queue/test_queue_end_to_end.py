"""End to end through the real CLI, a real Redis and a real `celery -A worker worker` process.

A job's images are read back the way a producer reads them: counts from ``client.status`` (one listing
of the completion records + one Redis round trip), each image's outcome and result key from its chunk's
completion record, the result itself from ``results/<image sha>/<result digest>/``.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from jobs.ledger import done_prefix
from slip.options import SegmentOptions
from slip.outputs import decode_rle
from slip.request import ModelRef, resolve

from queue_helpers import (
    TINY_CLI_ARGS,
    TINY_PARAMS,
    all_done,
    invoke_cli,
    items_of,
    job_id_from,
    make_images,
    outcomes,
    records,
    run_cli,
)

pytestmark = pytest.mark.integration
PROMPTS = ("a red box", "a blue disc")
IMAGES = 14
RESULT_FILES = ["mask_0.png", "mask_1.png", "overlay_0.png", "overlay_1.png", "segments.json"]


@pytest.fixture(scope="module")
def batch(worker, tmp_path_factory) -> dict:
    """14 images (7 chunks, 3 in flight at most) submitted with `slip submit segment DIR --prompt ... --prompt
    ... --render --wait` (a real console process)."""
    folder = tmp_path_factory.mktemp("batch")
    paths = make_images(folder, IMAGES)
    proc = run_cli(["submit", "segment", str(folder), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--wait",
                    "--render", "--batch-size", "2", "--max-in-flight", "3", *TINY_CLI_ARGS], worker["env"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"folder": folder, "paths": paths, "job": job_id_from(proc.stdout), "stdout": proc.stdout,
            "stderr": proc.stderr}


def store_root(worker) -> Path:
    return Path(worker["env"]["SLIP_STORE"])


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


def written_job(client, paths, prompts=("a red box",), params=TINY_PARAMS):
    """A written job of one chunk (manifest + items, not handed to the cluster): its manifest."""
    return client.create_job(paths, prompts, params, batch_size=len(paths))


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)
    return value


def test_health_reports_the_models_by_digest_loaded_in_the_pool_process(worker):
    from slip.rankers.loading import load_ranker_bundle
    from slip.sam import load_sam_bundle

    health = worker["health"]
    assert health["models_loaded"] and health["device"] == "cpu" and health["dtype"] == "fp32"
    # the models are named by what was really loaded: the same digests as loading them here
    assert health["sam"] == load_sam_bundle("tiny-random", device="cpu").ref.to_json()
    assert health["clip"] == load_ranker_bundle("tiny-random", device="cpu").ref.to_json()
    assert health["sam"]["arch"] == "tiny-random" and len(health["sam"]["sha256"]) == 64
    assert health["recommended_generator"] == {} and health["recommended_filters"] is None
    assert health["recommended_threshold"] is None
    assert health["memory"]["rss_bytes"] > 10_000_000 and health["threads"] >= 1
    assert health["pid"] != worker["process"].pid, "models must load in the forked pool process, not the parent"
    assert set(health["queues"]) >= {"gpu", "cpu"} and health["instance"]


def test_progress_in_a_log_is_plain_lines(batch):
    """stderr is a pipe here, as in a batch script's log: the progress is plain lines (no bar squeezed to 80
    columns), finished units never going back, the last one the finished job."""
    import re

    line = re.compile(rf"^{batch['job']} (\d+)/{IMAGES}: (\d+) done, (\d+) failed, (\d+) running, (\d+) queued, "
                      rf"(-- img/s|[\d.]+ img/s( over its run)?|finished before this look)(, ETA \d+ s)?$")
    found = [m for m in map(line.match, batch["stderr"].splitlines()) if m]
    assert found, batch["stderr"]
    finished = [int(m.group(1)) for m in found]
    assert finished == sorted(finished) and finished[-1] == IMAGES and int(found[-1].group(2)) == IMAGES
    assert found[-1].group(8) is None and "━" not in batch["stderr"]  # no ETA once finished; no bar


def test_waiting_on_a_finished_job_gives_the_rate_of_its_run(batch, client, worker):
    """`slip wait` on a job that ended before the look: its rate over its own run (start to end), the one
    `slip jobs` shows, not diluted by the time since it ended."""
    time.sleep(2.0)  # idle time after the end, which the rate must not count
    proc = run_cli(["wait", batch["job"]], worker["env"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    row = client.job(batch["job"])
    found = re.search(rf"{batch['job']} {IMAGES}/{IMAGES}: .* ([\d.]+) img/s over its run$", proc.stderr, re.M)
    assert found and float(found.group(1)) == pytest.approx(row.rate, abs=0.006), (proc.stderr, row)


def test_every_result_is_present_and_valid(batch, client, worker):
    assert f"{IMAGES} images: {IMAGES} done, 0 failed" in batch["stdout"]
    status = client.status(batch["job"])
    assert status.counts == all_done(IMAGES) and not status.active and status.finished
    health, root = worker["health"], store_root(worker)
    # the key a result lives under follows from the worker's weights (its health report) and the request
    request = resolve(SegmentOptions(**TINY_PARAMS), sam=ModelRef(**health["sam"]),
                      sam_generator=health["recommended_generator"], sam_filters=health["recommended_filters"],
                      ranker=ModelRef(**health["clip"]), ranker_threshold=health["recommended_threshold"])
    found, matched = outcomes(client.store, batch["job"]), 0
    items = items_of(client.store, batch["job"])
    assert [i.index for i in items] == list(range(IMAGES)) and sorted(found) == list(range(IMAGES))
    for item in items:
        outcome = found[item.index]
        assert outcome.state == "done" and outcome.how == "computed" and len(outcome.found) == 2
        assert outcome.result_key == f"results/{item.image_sha}/{request.result_digest(PROMPTS)}"
        folder = root / outcome.result_key
        assert sorted(os.listdir(folder)) == RESULT_FILES, "exactly one copy of each file, no temp files"
        width, height = Image.open(batch["folder"] / item.name).size
        for name in RESULT_FILES[:-1]:
            assert Image.open(folder / name).size == (width, height), name
        doc = json.loads((folder / "segments.json").read_text())
        assert doc["format_version"] == 2 and doc["request_digest"] == request.result_digest(PROMPTS)
        assert doc["request"] == request.to_json() and doc["runtime"]["points_per_batch"] == 64
        assert doc["image_size"] == {"height": height, "width": width} and doc["prompts"] == list(PROMPTS)
        masks = decode_rle([s["segmentation"] for s in doc["segments"]], height, width)
        assert masks.shape == (len(doc["segments"]), height, width)
        assert [int(m.sum()) for m in masks] == [s["area"] for s in doc["segments"]]
        for segment in doc["segments"]:  # bbox is pycocotools' toBbox of the RLE
            rle = {"size": segment["segmentation"]["size"], "counts": segment["segmentation"]["counts"].encode()}
            assert segment["bbox"] == [float(v) for v in mask_utils.toBbox(rle)]
        for i, match in enumerate(doc["matches"]):
            assert match["prompt"] == PROMPTS[i] and match["threshold"] is None
            union = np.zeros((height, width), bool)
            for instance in match["instances"]:
                union |= masks[instance["segment"]]
                assert doc["segments"][instance["segment"]]["similarity"][PROMPTS[i]] == pytest.approx(instance["score"])
            assert np.array_equal(np.asarray(Image.open(folder / f"mask_{i}.png")) > 0, union)
            scores = [c["score"] for c in match["top_k"]]
            assert scores == sorted(scores, reverse=True) and len(scores) <= 5
            if match["instances"]:  # "one" without a threshold: the best segment is the answer
                assert match["instances"] == [match["best"]] == match["top_k"][:1]
            assert outcome.found[i] == len(match["instances"])
            matched += bool(match["instances"])
    assert matched > 0, "the tiny-random settings must produce segments, or this test checks nothing"


def test_results_coco_jsonl_and_status_through_the_cli(batch, worker, client, tmp_path):
    out = tmp_path / "coco.json"
    proc = invoke_cli(["results", batch["job"], "--format", "coco", "--out", str(out)], worker["env"])
    assert proc.exit_code == 0, proc.stderr
    coco = COCO(str(out))
    assert len(coco.getImgIds()) == IMAGES
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(PROMPTS)
    anns = coco.loadAnns(coco.getAnnIds())
    assert anns, "matched segments become annotations"
    for ann in anns:
        img = coco.loadImgs(ann["image_id"])[0]
        mask = coco.annToMask(ann)
        assert mask.shape == (img["height"], img["width"]) and int(mask.sum()) == ann["area"]
        assert -1.0 <= ann["score"] <= 1.0
    jsonl = tmp_path / "out.jsonl"
    proc = invoke_cli(["results", batch["job"], "--format", "jsonl", "--out", str(jsonl)], worker["env"])
    assert proc.exit_code == 0, proc.stderr
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(lines) == IMAGES and all(r["state"] == "done" for r in lines)
    proc = invoke_cli(["status", batch["job"], "--json"], worker["env"])
    summary = {"job_id": batch["job"], "kind": "segment", "total": IMAGES, **all_done(IMAGES), "active": False,
               "retryable": 0, "failures": []}
    assert json.loads(proc.stdout) == summary
    # the job list: the finished job with its counts, from Redis alone
    proc = invoke_cli(["jobs", "--json", "--state", "finished"], worker["env"])
    assert proc.exit_code == 0, proc.output
    (row,) = [r for r in json.loads(proc.stdout) if r["job_id"] == batch["job"]]
    assert (row["kind"], row["unit"], row["total"], row["done"], row["failed"]) == ("segment", "image", IMAGES, IMAGES, 0)
    assert row["rate"] > 0 and row["eta_s"] is None and row["finished"] and row["in_flight"] == 0


def test_resubmit_reuses_every_result_and_rewrites_nothing(batch, worker, client):
    before = snapshot(store_root(worker) / "results"), snapshot(store_root(worker) / "proposals")
    proc = invoke_cli(["submit", "segment", str(batch["folder"]), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                       "--render", "--wait", *TINY_CLI_ARGS], worker["env"])
    assert proc.exit_code == 0, proc.stdout + proc.stderr
    job = job_id_from(proc.stdout)
    assert job != batch["job"]
    assert client.status(job).counts == all_done(IMAGES)
    again, first = outcomes(client.store, job), outcomes(client.store, batch["job"])
    assert {o.how for o in again.values()} == {"existing"}, "each result was found, none recomputed"
    assert {i: o.result_key for i, o in again.items()} == {i: o.result_key for i, o in first.items()}
    assert (snapshot(store_root(worker) / "results"), snapshot(store_root(worker) / "proposals")) == before


def test_a_redelivered_or_stale_message_writes_nothing_and_a_rerun_finds_the_results(worker, client, tmp_path):
    manifest = written_job(client, make_images(tmp_path, 1, seed=7))
    job, done_key = manifest.job_id, f"{done_prefix(manifest.job_id)}/c0000000-d.json"
    client.send("segment", job, 0, 0, again=False)
    wait_until(lambda: client.store.exists(done_key), 120, "the first delivery to finish")
    (outcome,) = outcomes(client.store, job).values()
    assert outcome.how == "computed"
    result_dir = store_root(worker) / outcome.result_key
    proposals_dir = store_root(worker) / "proposals" / items_of(client.store, job)[0].image_sha
    first = (snapshot(result_dir), snapshot(proposals_dir))
    # the broker delivers the same message again (as after a worker loss), and a late copy of an older attempt
    client.send("segment", job, 0, 0, again=False)
    wait_until(lambda: re.findall(rf"slip\.segment\[{job}\.0\.0\] succeeded.*", worker["log"].read_text())[1:],
               120, "the redelivery")
    assert (snapshot(result_dir), snapshot(proposals_dir)) == first, "the redelivery rewrote nothing"
    assert client.store.list(done_prefix(job)) == [done_key], "one completion record per chunk"
    runs = re.findall(rf"slip\.segment\[{job}\.0\.0\] succeeded.*", worker["log"].read_text())
    assert "'letters': 'd'" in runs[0] and "'done': 1, 'failed': 0" in runs[0], runs  # the counts show in Flower
    assert "'stale': True" in runs[1], runs  # acknowledged without work: the chunk is finished
    # the chunk made unfinished (as `slip retry` does) and run again: the result exists, nothing is recomputed
    client.board.reopen(job, {0: "d"})
    client.send("segment", job, 0, 0, again=False)
    wait_until(lambda: len(re.findall(rf"slip\.segment\[{job}\.0\.0\] succeeded", worker["log"].read_text())) == 3,
               120, "the re-run")
    assert outcomes(client.store, job)[0].how == "existing"
    assert (snapshot(result_dir), snapshot(proposals_dir)) == first
    assert sorted(os.listdir(result_dir)) == ["segments.json"], "no PNGs unless asked for"


def test_a_chunk_out_of_attempts_is_poison_and_fails_without_running(worker, client, tmp_path):
    manifest = written_job(client, make_images(tmp_path, 1, seed=9))
    max_attempts = client.settings.max_attempts
    # its earlier attempts killed their workers (each was sent again by a reaper): this one is past the budget
    client.send("segment", manifest.job_id, 0, max_attempts, again=True)
    wait_until(lambda: records(client.store, manifest.job_id), 120, "the poison chunk's record")
    (record,) = records(client.store, manifest.job_id)
    (outcome,) = record.items
    assert record.letters == "p" and outcome.permanent and outcome.error == "Poison"
    assert outcome.reason.startswith(f"poison: sent {max_attempts} times, never finished")
    assert f"SLIP_MAX_ATTEMPTS={max_attempts}" in outcome.reason
    item = items_of(client.store, manifest.job_id)[0]
    assert not (store_root(worker) / "proposals" / item.image_sha).exists(), "the poison chunk did not run"
    status = client.status(manifest.job_id)
    assert status.counts["failed"] == 1 and status.retryable == 0, "a poison chunk is failed for good"
    assert client.failed_units(status) == [(0, item.name, outcome.reason)]
    (group,) = client.failures(manifest.job_id)
    assert (group.error, group.count, group.permanent, group.examples) == ("Poison", 1, True, [(0, item.name)])


def test_lost_images_are_found_and_handed_over_again(worker, client, tmp_path):
    """A producer that wrote the job but died before handing it to the cluster (or a Redis that lost it)."""
    manifest = client.create_job(make_images(tmp_path, 3, seed=10), list(PROMPTS), TINY_PARAMS, batch_size=2)
    status = client.status(manifest.job_id)
    assert status.counts == {**all_done(0), "lost": 3} and not status.active
    proc = invoke_cli(["status", manifest.job_id], worker["env"])
    assert proc.exit_code == 1 and f"`slip retry {manifest.job_id}` hands them over again" in proc.stdout
    assert client.retry(manifest.job_id) == 3, "slip retry hands lost images to the cluster"
    assert client.wait(manifest.job_id, timeout_s=120).counts == all_done(3)


def test_the_in_flight_window_bounds_what_is_sent(worker, client, tmp_path):
    window, seen, stop = 2, [], threading.Event()
    job_ids: list[str] = []

    def watch() -> None:
        while not stop.is_set():
            if job_ids:
                view = client.board.view(job_ids[0])
                in_flight = sum(not view.finished(c) for c in range(view.next))
                seen.append((in_flight, client.queue_depths()["gpu"]))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        job = client.submit_segment(make_images(tmp_path, 6, seed=11), ["a red box"], TINY_PARAMS, batch_size=1,
                                    max_in_flight=window, on_job=job_ids.append)
        assert client.wait(job, timeout_s=120, poll_s=0.2).counts == all_done(6)
    finally:
        stop.set()
        watcher.join()
    assert seen and max(sent for sent, _ in seen) == window, "the window was used, and never exceeded"
    assert max(queued for _, queued in seen) <= window, "the broker never held more than the window"
    assert len(records(client.store, job)) == 6


def test_a_store_failure_fails_for_now_runs_again_then_stays_failed_and_slip_retry_recovers(worker, client, tmp_path):
    (image,) = make_images(tmp_path, 1, seed=12, prefix="blocked")
    manifest = client.create_job([image], ["a red box"], TINY_PARAMS)
    (item,) = items_of(client.store, manifest.job_id)
    blocker = store_root(worker) / "proposals" / item.image_sha
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_bytes(b"a file where the proposals folder must go: every write under it fails")
    try:
        client.start(manifest, window=4)
        status = client.wait(manifest.job_id, timeout_s=120, poll_s=0.5)  # failed for now, run again once, stays so
    finally:
        blocker.unlink()
    assert status.counts["failed"] == 1 and status.retryable == 1 and not status.active
    (record,) = records(client.store, manifest.job_id)
    (outcome,) = record.items
    assert record.attempt == 1, "the chunk ran again (SLIP_MAX_ATTEMPTS=2), then stayed failed for now"
    assert outcome.state == "failed" and not outcome.permanent and outcome.error == "StoreError"
    assert outcome.reason.startswith(f"store {client.store.url}: cannot write"), outcome.reason
    log = worker["log"].read_text()
    assert re.search(rf"job {manifest.job_id} chunk 0: sending again \(attempt 1\): 1 unit\(s\) failed for now", log)
    proc = invoke_cli(["retry", manifest.job_id, "--wait"], worker["env"])
    assert proc.exit_code == 0 and "sent 1 failed unit(s) again" in proc.stdout, proc.stdout + proc.stderr
    assert client.status(manifest.job_id).counts == all_done(1)
