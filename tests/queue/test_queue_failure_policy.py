"""The failure policy (worker.policy) of a chunk, run in-process on real resources: ``worker.tasks.run_chunk``
over the tiny-random models, a real directory store and the real Redis (db 14).

Every branch of the policy is reached by a real cause: a corrupt image (permanent), a store that refuses
writes (transient: failed for now, the chunk sent once more), a malformed cache entry (a bug: failed for now,
traceback logged), a chunk sent past its attempts (poison), a worker holding other models, and a real
out-of-memory error: the mask decoder's allocation refused by the operating system (a subprocess whose
address space is limited with ``RLIMIT_AS``), which must halve ``points_per_batch``.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jobs.ledger import done_key
from jobs.model import Item
from jobs.settings import Settings
from jobs.store import Store
from slip.errors import DeviceOutOfMemoryError
from worker.policy import run_unit
from worker.proposals import proposals_key
from worker.resources import load_resources
from worker.tasks import run_chunk

from queue_helpers import REPO, TINY_PARAMS, client_for, flush, items_of, make_images, outcomes, queue_env, records
import redis_dbs

DB = redis_dbs.FAILURE_POLICY


@pytest.fixture()
def resources(redis_alive, tmp_path):
    flush(DB)
    settings = Settings.from_env(queue_env(tmp_path / "store", db=DB, SLIP_POINTS_PER_BATCH="32"))
    res = load_resources(settings, load_models=True, send=lambda *args, **kw: res.sent.append((args, kw)))
    res.sent = []  # what the chunk sent: (kind, job, chunk, attempt), {"again": ...}
    yield res
    res.close()
    flush(DB)


def job_of(res, paths, prompts=("a red box",), params=TINY_PARAMS, **options) -> str:
    """A written job of one chunk holding ``paths`` (``options``: sam=, clip= of the job): its id."""
    return client_of(res).create_job(paths, prompts, params, batch_size=len(paths), **options).job_id


def client_of(res):
    """The producer's client on the resources' Redis and store."""
    from producer.client import QueueClient

    return QueueClient(res.settings, store=res.store)


def run(res, job: str, attempt: int = 0) -> dict:
    return run_chunk(res, job, 0, attempt, task_id=f"{job}.0.{attempt}", node="w")


def test_a_bad_image_in_a_chunk_fails_alone_for_good(resources, tmp_path):
    good = make_images(tmp_path, 2, seed=30)
    bad = tmp_path / "broken.png"
    bad.write_bytes(good[0].read_bytes()[:40])
    job = job_of(resources, [good[0], bad, good[1]])
    done = run(resources, job)
    assert (done["letters"], done["done"], done["failed"]) == ("dpd", 2, 1)
    (record,) = records(resources.store, job)
    assert record.task_id == f"{job}.0.0" and record.worker == "w" and record.attempt == 0
    failed = record.items[1]
    assert failed.error == "ImageError" and failed.permanent and "not an image" in failed.reason
    assert resources.store.get_json(done_key(job, 0, "dpd"))["items"][1]["reason"] == failed.reason
    view = resources.board.view(job)
    assert view.finished(0) and not view.running, "finished for good: nothing held, nothing left to retry"
    assert resources.sent == [], "a chunk failed for good is not sent again"
    again = job_of(resources, good)
    assert run(resources, again)["letters"] == "dd"
    assert [o.how for o in outcomes(resources.store, again).values()] == ["existing", "existing"], \
        "results that exist are not recomputed"


def test_a_store_failure_fails_for_now_and_the_chunk_runs_again(resources, tmp_path):
    job = job_of(resources, make_images(tmp_path, 1, seed=33))
    item = items_of(resources.store, job)[0]
    blocker = Path(resources.settings.store) / "proposals" / item.image_sha
    blocker.parent.mkdir(parents=True)
    blocker.write_bytes(b"a file where a folder must go")
    done = run(resources, job)
    (outcome,) = records(resources.store, job)[0].items
    assert done["letters"] == "t" and outcome.error == "StoreError" and not outcome.permanent
    assert outcome.reason.startswith(f"store {resources.store.url}: cannot write"), outcome.reason
    assert resources.sent == [(("segment", job, 0, 1), {"again": False})], "once more, behind the waiting chunks"
    view = resources.board.view(job)
    assert not view.finished(0) and view.head["a0"] == "1"
    last = run(resources, job, attempt=1)  # SLIP_MAX_ATTEMPTS=2: the last attempt stays failed for now
    assert last["letters"] == "t" and len(resources.sent) == 1 and resources.board.view(job).finished(0)
    assert client_of(resources).status(job).retryable == 1, "`slip retry` can run it again"


def test_an_unexpected_error_is_a_bug_failed_for_now_with_its_traceback_logged(resources, tmp_path, caplog):
    job = job_of(resources, make_images(tmp_path, 1, seed=34))
    item = items_of(resources.store, job)[0]
    resolved = resources.engine(resources.spec(resources.manifest(job)).options).request
    malformed = {"format_version": 2, "image_size": {"height": 8, "width": 8}, "generated": 1, "filters": [],
                 "segments": [{"id": 0}]}  # a cache entry whose segment lost its fields
    resources.store.put_json(proposals_key(item.image_sha, resolved), malformed)
    with caplog.at_level(logging.ERROR, logger="slip.worker"):
        done = run(resources, job)
    (outcome,) = records(resources.store, job)[0].items
    assert done["letters"] == "t" and not outcome.permanent and outcome.error == "KeyError"
    assert outcome.reason.startswith("internal error: KeyError")
    logged = [r for r in caplog.records if r.levelno == logging.ERROR and "internal error" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None, "the traceback is logged"


def test_a_chunk_sent_past_its_attempts_is_poison_and_fails_without_running(resources, tmp_path):
    job = job_of(resources, make_images(tmp_path, 1, seed=32))
    max_attempts = resources.settings.max_attempts
    done = run(resources, job, attempt=max_attempts)  # each earlier attempt killed its worker
    (outcome,) = records(resources.store, job)[0].items
    assert done["letters"] == "p" and outcome.error == "Poison" and outcome.permanent
    assert outcome.reason.startswith(f"poison: sent {max_attempts} times, never finished")
    assert not (Path(resources.settings.store) / "proposals").exists(), "it did not run"
    assert run(resources, job)["stale"], "an older attempt delivered late does nothing: the chunk is finished"
    fresh = job_of(resources, make_images(tmp_path / "fresh", 1, seed=35))
    assert run(resources, fresh)["letters"] == "d"


def test_a_soft_time_limit_is_named_a_time_limit_not_poison(resources, tmp_path):
    from celery.exceptions import SoftTimeLimitExceeded

    job = job_of(resources, make_images(tmp_path, 2, seed=37))

    def slow(res, manifest, item, **_):
        raise SoftTimeLimitExceeded()

    run_chunk(resources, job, 0, 0, task_id="t", node="w", processors={"segment": slow})
    outcomes_ = records(resources.store, job)[0].items
    assert [o.error for o in outcomes_] == ["TimeLimit", "TimeLimit"] and not any(o.permanent for o in outcomes_)
    assert outcomes_[0].reason.startswith("time limit: the task ran past 108.0 s (SLIP_TASK_TIME_LIMIT)")


def test_a_job_for_other_models_fails_for_now_naming_what_to_start(resources, tmp_path):
    job = job_of(resources, make_images(tmp_path, 1, seed=36), sam="vit_b")
    run(resources, job)
    (outcome,) = records(resources.store, job)[0].items
    assert outcome.state == "failed" and not outcome.permanent and outcome.error == "ModelMismatchError"
    assert "the job asks for sam=vit_b" in outcome.reason and "SLIP_SAM=vit_b" in outcome.reason


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   DeviceOutOfMemoryError("out of memory while generating masks")])
def test_the_policy_halves_points_per_batch_on_out_of_memory(error):
    """The policy's arithmetic, alone (the real error from the real decoder: the next test)."""
    item = Item(index=0, image_key="inputs/" + "a" * 64 + ".png", image_sha="a" * 64, name="big.png")
    asked = []

    def attempt(points_per_batch: int):
        asked.append(points_per_batch)
        if points_per_batch > 8:
            raise error
        return "done"

    assert run_unit(attempt, item, points_per_batch=64) == "done"
    assert asked == [64, 32, 16, 8], "halved at once, no back-off"
    asked.clear()
    gave_up = run_unit(lambda ppb: attempt(ppb * 100), item, points_per_batch=128)
    assert asked == [12800, 6400, 3200, 1600, 800, 400, 200, 100] and gave_up.state == "failed"
    assert not gave_up.permanent and gave_up.reason.startswith("out of memory even with points_per_batch=1")


# --- the real out-of-memory path -----------------------------------------------------------------------------
#
# The mask decoder returns (B, 3, h, w) low-resolution logits for a batch of B point prompts, so its memory
# grows with points_per_batch; the SAM below (narrow, but a 1024 input and so 256 x 256 logits) needs about
# 2 MB per point: ~400 MB for a batch of 196 points, ~200 MB for 98, and a few seconds. The subprocess
# measures what a batch of half the points needs (its peak RSS over one run, after a warm-up), then limits
# its address space to 1.5 times that: the host refuses the allocations of a full batch, as a GPU runs out
# of memory. (On CPU, torch reports a refused allocation as a RuntimeError from its DefaultCPUAllocator.)

OOM_POINTS = 196  # points_per_batch the chunk starts with: a 14 x 14 grid in one batch
OOM_SCRIPT = """
import dataclasses, json, logging, os, resource, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                    force=True)
from jobs.status import chunk_records
from jobs.settings import Settings
from worker.resources import load_resources, set_threads
from worker.tasks import run_chunk


def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def run(name, points_per_batch=None):
    models = dataclasses.replace(settings.models, points_per_batch=points_per_batch or settings.models.points_per_batch)
    with_ppb = dataclasses.replace(res, settings=dataclasses.replace(settings, models=models))
    run_chunk(with_ppb, args[name], 0, 0, task_id=name, node="oom")
    return next(chunk_records(res.store, args[name]))


args = json.loads(sys.argv[1])
settings = Settings.from_env(os.environ)
set_threads(settings, 1)
res = load_resources(settings, load_models=True, send=lambda *a, **k: None)
run("warm")  # a few points: lazy imports, the encoder's and allocator's first-run set-up
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS
run("calibrate", points_per_batch=args["points"] // 2)
half = status("VmHWM") - before  # what a batch of half the points needs
limit = status("VmSize") + int(1.5 * half)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # the host now refuses larger allocations
print(f"a batch of {args['points'] // 2} points needs {half >> 20} MB; address space limited to "
      f"{int(1.5 * half) >> 20} MB more", file=sys.stderr, flush=True)
record = run("request", points_per_batch=args["points"])
print(json.dumps(record.model_dump(mode="json")))
"""


def oom_sam(folder: Path) -> Path:
    """A randomly initialised SAM, saved in the official format with its config: narrow (fast), with a 1024
    input (256 x 256 low-resolution masks: the decoder's output is large per point)."""
    from slip.sam import SamArch, build_sam, save_sam

    arch = SamArch(encoder_embed_dim=16, encoder_depth=1, encoder_num_heads=1, encoder_global_attn_indexes=(0,),
                   img_size=1024, window_size=8, prompt_embed_dim=8, decoder_depth=1, decoder_mlp_dim=16,
                   decoder_num_heads=1, iou_head_hidden_dim=8, mask_in_chans=4, name="oom-test")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return save_sam(build_sam(arch), folder / "sam.pth", arch)


def test_a_real_out_of_memory_error_halves_points_per_batch_and_the_image_completes(redis_alive, tmp_path):
    """The host refuses the decoder's allocations at 196 points per batch: the worker must retry with 98,
    which fit, and finish the image (worker.policy: OOM halves points_per_batch)."""
    flush(DB)
    env = queue_env(tmp_path / "store", db=DB, SLIP_SAM=str(oom_sam(tmp_path / "sam")))
    settings = Settings.from_env(env)
    client = client_for(env)
    store = Store(settings.store)
    rng = np.random.default_rng(0)
    # pred_iou_thresh 1.0 keeps no candidate: the decoder runs in full, nothing after it costs time
    params = {**TINY_PARAMS, "points_per_side": 14, "pred_iou_thresh": 1.0}
    args = {"points": OOM_POINTS}
    for name in ("warm", "calibrate", "request"):
        path = tmp_path / f"{name}.png"
        Image.fromarray((rng.random((96, 96, 3)) * 255).astype(np.uint8)).save(path)
        options = {**params, "points_per_side": 2} if name == "warm" else params
        args[name] = client.create_job([path], ["a red box"], options, batch_size=1).job_id
    try:
        # a fixed mmap threshold: glibc gives freed large blocks back at once (its dynamic threshold would keep the
        # calibration's buffers mapped, and the request's batch would fit in them under the address-space limit)
        done = subprocess.run([sys.executable, "-c", OOM_SCRIPT, json.dumps(args)], cwd=REPO, capture_output=True,
                              env={**env, "MALLOC_MMAP_THRESHOLD_": "131072"}, text=True, timeout=300)
    finally:
        flush(DB)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    (outcome,) = record["items"]
    log = "\n".join(line for line in done.stderr.splitlines() if "slip." in line or "needs" in line)
    assert f"out of memory; retrying with points_per_batch={OOM_POINTS // 2}" in done.stderr, \
        f"the first attempt must run out of memory and be retried with half the points: {outcome}\n{log[-3000:]}"
    assert outcome["state"] == "done", f"{outcome['reason']}\n{log[-3000:]}"
    doc = store.get_json(f"{outcome['result_key']}/segments.json")
    assert doc["runtime"]["points_per_batch"] < OOM_POINTS
    assert outcomes(store, record["job_id"])[0].state == "done"
    client.board.r.close()
