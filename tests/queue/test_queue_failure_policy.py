"""The segment task's failure policy, called in-process on real resources (tiny models, real Redis).

A CUDA out-of-memory error cannot happen on a CPU-only machine, so that one case swaps the pipeline for
one that raises it; everything else runs for real.
"""

from __future__ import annotations

import pytest
import torch

from slip.errors import DeviceOutOfMemoryError
from worker.jobs import SegmentRequest
from worker.resources import load_resources
from worker.settings import Settings
from worker.tasks import _Retry, run_segment

from queue_helpers import TINY_PARAMS, flush, make_images, queue_env

DB = 11


@pytest.fixture()
def resources(redis_alive, tmp_path):
    settings = Settings.from_env(queue_env(tmp_path / "store", db=DB, SLIP_POINTS_PER_BATCH="32"))
    res = load_resources(settings, load_models=True)
    yield res
    res.close()
    flush(DB)


def request_for(res, paths, prompts=("a red box",)) -> SegmentRequest:
    from producer.client import QueueClient

    manifest = QueueClient(res.settings, store=res.store).create_job(paths, prompts, TINY_PARAMS)
    return SegmentRequest(job_id=manifest.job_id, items=manifest.items, spec=manifest.spec)


def test_bad_image_in_a_batch_fails_alone(resources, tmp_path):
    good = make_images(tmp_path, 2, seed=30)
    bad = tmp_path / "broken.png"
    bad.write_bytes(good[0].read_bytes()[:40])
    response = run_segment(resources, request_for(resources, [good[0], bad, good[1]]), task_id="t1", retries=0, worker="w")
    assert [r.status for r in response.items] == ["done", "failed", "done"]
    assert response.items[1].error == "ImageError" and "not an image" in response.items[1].reason
    again = run_segment(resources, request_for(resources, good), task_id="t2", retries=0, worker="w")
    assert [r.status for r in again.items] == ["skipped", "skipped"], "results that exist are not recomputed"


def test_out_of_memory_retries_with_half_the_points_batch(resources, tmp_path, monkeypatch):
    class OutOfMemoryPipeline:
        device = torch.device("cpu")

        def propose(self, image, timer=None):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    asked = []
    monkeypatch.setattr(resources, "pipeline", lambda params, points_per_batch=None: asked.append(points_per_batch) or OutOfMemoryPipeline())
    request = request_for(resources, make_images(tmp_path, 1, seed=31))
    with pytest.raises(_Retry) as first:
        run_segment(resources, request, task_id="t3", retries=0, worker="w")
    assert isinstance(first.value.cause, DeviceOutOfMemoryError)
    assert first.value.request.points_per_batch == 16  # SLIP_POINTS_PER_BATCH=32, halved
    with pytest.raises(_Retry) as second:
        run_segment(resources, first.value.request, task_id="t3", retries=1, worker="w")
    assert second.value.request.points_per_batch == 8 and asked == [None, 16]


def test_delivery_counter_marks_poison(resources, tmp_path):
    request = request_for(resources, make_images(tmp_path, 1, seed=32))
    max_deliveries = resources.settings.max_deliveries
    for _ in range(max_deliveries):  # each delivery "killed its worker": the counter was never cleared
        resources.redis.incr("slip:deliveries:t4:0")
    response = run_segment(resources, request, task_id="t4", retries=0, worker="w")
    (record,) = response.items
    assert record.status == "failed" and record.error == "PoisonMessage"
    assert record.reason.startswith(f"poison: killed its worker {max_deliveries} times")
    fresh = run_segment(resources, request, task_id="t5", retries=0, worker="w")
    assert fresh.items[0].status == "done" and resources.redis.get("slip:deliveries:t5:0") is None
