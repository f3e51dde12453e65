"""The segment task's failure policy (worker.policy), run in-process on real resources: ``worker.tasks.run_chunk``
over the tiny-random models, a real directory store and the real Redis (db 14).

Every branch of the policy is reached by a real cause: a corrupt image (permanent), a store that refuses
writes (transient: back-off, then failed for now and sent again later), a malformed cache entry (a bug:
failed for now, traceback logged), a chunk started too often (poison), a worker holding other models, and
a real out-of-memory error: the mask decoder's allocation refused by the operating system (a subprocess
whose address space is limited with ``RLIMIT_AS``), which must halve ``points_per_batch``.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from slip.errors import DeviceOutOfMemoryError
from worker.jobs import Item, SegmentRequest
from worker.ledger import done_key
from worker.policy import FailurePolicy
from worker.proposals import proposals_key
from worker.resources import load_resources
from worker.settings import Settings
from worker.store import Store
from worker.tasks import run_chunk

from queue_helpers import REPO, TINY_PARAMS, flush, items_of, make_images, outcomes, queue_env

DB = 14


@pytest.fixture()
def resources(redis_alive, tmp_path):
    flush(DB)
    settings = Settings.from_env(queue_env(tmp_path / "store", db=DB, SLIP_POINTS_PER_BATCH="32"))
    sent: list = []
    res = load_resources(settings, load_models=True, publish=lambda request, task_id: sent.append(task_id))
    yield res
    res.close()
    flush(DB)
    assert sent == [], "a chunk run outside a registered job sends nothing"


def chunk_of(settings: Settings, store, paths, prompts=("a red box",), params=TINY_PARAMS, **changes) -> SegmentRequest:
    """Chunk 0 of a job holding ``paths``, written to ``store`` (``changes``: to the job's spec)."""
    from producer.client import QueueClient

    manifest = QueueClient(settings, store=store).create_job(paths, prompts, params, batch_size=len(paths))
    spec = manifest.spec.model_copy(update=changes)
    return SegmentRequest(job_id=manifest.job_id, chunk=0, items=tuple(items_of(store, manifest.job_id)), spec=spec)


def request_for(res, paths, **options) -> SegmentRequest:
    return chunk_of(res.settings, res.store, paths, **options)


def test_a_bad_image_in_a_chunk_fails_alone_for_good(resources, tmp_path):
    good = make_images(tmp_path, 2, seed=30)
    bad = tmp_path / "broken.png"
    bad.write_bytes(good[0].read_bytes()[:40])
    request = request_for(resources, [good[0], bad, good[1]])
    record = run_chunk(resources, request, task_id="t1", node="w")
    assert record.letters == "dpd" and record.task_id == "t1" and record.worker == "w"
    failed = record.items[1]
    assert failed.error == "ImageError" and failed.permanent and "not an image" in failed.reason
    assert resources.store.get_json(done_key(request.job_id, 0, "dpd"))["items"][1]["reason"] == failed.reason
    board = resources.board
    assert board.done_bits(request.job_id) == b"\x80", "finished: nothing left to retry"
    assert not board.r.hexists(board.key(request.job_id, "deliveries"), 0)
    assert not board.r.hexists(board.key(request.job_id, "running"), 0)
    again = run_chunk(resources, request_for(resources, good), task_id="t2", node="w")
    assert [o.how for o in again.items] == ["existing", "existing"], "results that exist are not recomputed"


def test_a_store_failure_is_retried_with_back_off_then_failed_for_now_and_due_again(resources, tmp_path, caplog):
    request = request_for(resources, make_images(tmp_path, 1, seed=33))
    blocker = Path(resources.settings.store) / "proposals" / request.items[0].image_sha
    blocker.parent.mkdir(parents=True)
    blocker.write_bytes(b"a file where a folder must go")
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="slip.worker"):
        record = run_chunk(resources, request, task_id="t3", node="w")
    (outcome,) = record.items
    assert record.letters == "t" and outcome.error == "StoreError" and not outcome.permanent
    assert outcome.reason.startswith("gave up after 2 retries: StoreError: ")
    retries = [m for m in caplog.messages if "; retry " in m]
    assert len(retries) == 2 and "retry 1/2 in 0.5 s" in retries[0] and "retry 2/2 in 1.0 s" in retries[1], retries
    assert time.monotonic() - started >= 1.5, "the back-off was slept (0.5 s, then 1.0 s)"
    due = resources.board.view(request.job_id).retry[0]
    assert 5 < due - time.time() <= 10, "the chunk is due to be sent again in about 10 s"
    assert resources.board.done_bits(request.job_id) == b""


def test_an_unexpected_error_is_a_bug_failed_for_now_with_its_traceback_logged(resources, tmp_path, caplog):
    request = request_for(resources, make_images(tmp_path, 1, seed=34))
    item = request.items[0]
    resolved = resources.resolve(request.spec.params)
    malformed = {"format_version": 2, "image_size": {"height": 8, "width": 8}, "generated": 1, "filters": [],
                 "segments": [{"id": 0}]}  # a cache entry whose segment lost its fields
    resources.store.put_json(proposals_key(item.image_sha, resolved), malformed)
    with caplog.at_level(logging.ERROR, logger="slip.worker"):
        record = run_chunk(resources, request, task_id="t4", node="w")
    (outcome,) = record.items
    assert record.letters == "t" and not outcome.permanent and outcome.error == "KeyError"
    assert outcome.reason.startswith("internal error: KeyError")
    logged = [r for r in caplog.records if r.levelno == logging.ERROR and "internal error" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None, "the traceback is logged"


def test_a_chunk_started_too_often_is_poison_and_fails_without_running(resources, tmp_path):
    request = request_for(resources, make_images(tmp_path, 1, seed=32))
    board, max_deliveries = resources.board, resources.settings.max_deliveries
    board.r.hset(board.key(request.job_id, "deliveries"), 0, max_deliveries)  # it killed its worker each time
    record = run_chunk(resources, request, task_id="t5", node="w")
    (outcome,) = record.items
    assert record.letters == "p" and outcome.error == "Poison" and outcome.permanent
    assert outcome.reason.startswith(f"poison: started {max_deliveries} times without finishing")
    assert not (Path(resources.settings.store) / "proposals").exists(), "it did not run"
    fresh = request_for(resources, make_images(tmp_path / "fresh", 1, seed=35))
    assert run_chunk(resources, fresh, task_id="t6", node="w").letters == "d"
    assert not board.r.hexists(board.key(fresh.job_id, "deliveries"), 0), "a finished chunk's count is cleared"


def test_a_job_for_other_models_fails_for_now_naming_what_to_start(resources, tmp_path):
    request = request_for(resources, make_images(tmp_path, 1, seed=36), sam="vit_b")
    (outcome,) = run_chunk(resources, request, task_id="t7", node="w").items
    assert outcome.state == "failed" and not outcome.permanent and outcome.error == "ModelMismatchError"
    assert "the job asks for sam=vit_b" in outcome.reason and "SLIP_SAM=vit_b" in outcome.reason


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   DeviceOutOfMemoryError("out of memory while generating masks")])
def test_the_policy_halves_points_per_batch_on_out_of_memory(error):
    """The policy's arithmetic, alone (the real error from the real decoder: the next test)."""
    policy = FailurePolicy(max_retries=3, backoff_s=60.0, max_deliveries=3, max_resends=1)
    item = Item(index=0, image_key="inputs/" + "a" * 64 + ".png", image_sha="a" * 64, name="big.png")
    asked = []

    def no_sleep(seconds: float) -> None:
        pytest.fail(f"an out-of-memory error is retried at once, not after {seconds} s")

    def attempt(points_per_batch: int):
        asked.append(points_per_batch)
        if points_per_batch > 8:
            raise error
        return "done"

    assert policy.run_item(attempt, item, points_per_batch=64, sleep=no_sleep) == "done"
    assert asked == [64, 32, 16, 8], "halved at once, no back-off"
    asked.clear()
    gave_up = policy.run_item(attempt, item, points_per_batch=128, sleep=no_sleep)
    assert asked == [128, 64, 32, 16] and gave_up.state == "failed" and not gave_up.permanent
    assert gave_up.reason.startswith("out of memory even with points_per_batch=16")


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
import json, logging, os, resource, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                    force=True)
from worker.jobs import SegmentRequest
from worker.resources import load_resources, set_threads
from worker.settings import Settings
from worker.tasks import run_chunk


def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


args = json.loads(sys.argv[1])
settings = Settings.from_env(os.environ)
set_threads(settings, 1)
res = load_resources(settings, load_models=True, publish=lambda request, task_id: None)
run = lambda name, **update: run_chunk(res, SegmentRequest.model_validate(args[name]).model_copy(update=update),
                                       task_id=name, node="oom")
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
    env = queue_env(tmp_path / "store", db=DB, SLIP_SAM=str(oom_sam(tmp_path / "sam")), SLIP_MAX_RETRIES="4")
    settings = Settings.from_env(env)
    store = Store(settings.store)
    rng = np.random.default_rng(0)
    # pred_iou_thresh 1.0 keeps no candidate: the decoder runs in full, nothing after it costs time
    params = {**TINY_PARAMS, "points_per_side": 14, "pred_iou_thresh": 1.0}
    args = {"points": OOM_POINTS}
    for name in ("warm", "calibrate", "request"):
        path = tmp_path / f"{name}.png"
        Image.fromarray((rng.random((96, 96, 3)) * 255).astype(np.uint8)).save(path)
        options = {**params, "points_per_side": 2} if name == "warm" else params
        args[name] = chunk_of(settings, store, [path], params=options).model_dump(mode="json")
    try:
        done = subprocess.run([sys.executable, "-c", OOM_SCRIPT, json.dumps(args)], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=300)
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
