"""The short chaos run (bench/chaos.py) as a CI test: about 80 images, two supervised workers, a few
SIGKILLs of whole workers and of pool processes mid-task, one Redis SIGKILL and AOF restart, the producer
SIGKILLed once it has handed the job over; then every image must have exactly one complete result,
nothing lost or torn, no temporary file left, the COCO export must load, and nobody retried anything by hand.

The producer is killed once its first chunks are claimed (``kill_producer="fed"``). Speed targets (wall time
under chaos at most 1.5 x undisturbed, a killed chunk done elsewhere within 30 s) live in the bench, not here.
"""

from __future__ import annotations


import pytest

from queue_helpers import bench_module  # noqa: E402

pytestmark = pytest.mark.integration

IMAGES = 120  # with faults every 1-2.5 s, long enough that they land mid-job on a quiet machine too


def _bench_chaos():
    return bench_module("chaos")


def test_short_chaos_run_every_image_exactly_once(tmp_path):
    chaos = _bench_chaos()
    images = chaos.make_images(tmp_path / "images", IMAGES, seed=11)
    plan = chaos.Plan(kills=3, kill_every=(1.0, 2.5), redis_down=(2.0, 4.0), redis_after_kill=1, seed=11)
    result = chaos.run(images, workdir=tmp_path / "run", workers=2, plan=plan, timeout_s=240, settle_s=2.0,
                       kill_producer="fed")
    print(chaos.summary_line(result))
    report = {k: result[k] for k in ("kills", "kill_log", "redis_log", "reapers", "examples", "status_at_finish",
                                     "chaos_errors", "temporaries_left")}
    assert result["finished"], report
    assert result["kills"]["total"] >= 2 and result["kills"]["mid_task"] >= 1, report
    assert result["redis_restarts"] == 1, report
    assert result["exactly_once"] == IMAGES, report
    assert result["lost"] == result["torn"] == result["several_results"] == result["not_done"] == 0, report
    assert result["temporaries_left"] == 0, report
    assert result["status_ever_lost"] == 0, report  # `slip status` never called a live job's images lost
    assert result["manual_retries"] == 0
    assert result["coco"].get("images") == IMAGES, result["coco"]
