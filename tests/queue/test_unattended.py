"""Unattended bulk jobs, with real processes: submit and walk away; the cluster feeds itself, survives a dead
worker, a killed pool process, a Redis restart and an S3 outage, and nobody ever retries by hand.
(About 5 minutes on a loaded 2-core machine: worker start-ups, and the fault timings the defaults imply.)

Everything runs with the queue's default timing (``SLIP_DEAD_AFTER`` 10 s, a reaper beat every 1.7 s,
visibility timeout 3600 s) against a private ``redis-server`` with an AOF fsynced on
every write (it can be SIGKILLed and restarted on the same port), real ``celery -A worker worker``
processes with the ``tiny-random`` models, the ``slip`` CLI (a subprocess where the process matters), a
directory store, and moto's S3 server (``tests/s3_server.py``) for the S3 outage. Images take ~0.2-0.5 s
each (a 12 x 12 SAM grid, every proposal kept: ``SEGMENT_ARGS`` of bench/chaos.py), slow enough to catch
a chunk mid-flight; no sleeps in production code. The process helpers are bench/chaos.py's.

The control plane's properties that a real run would make a matter of luck are checked in-process in
``test_reaper.py``.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from queue_helpers import bench_module  # noqa: E402

pytestmark = pytest.mark.integration

SLOW = 60.0  # seconds a small job may take on a loaded 2-core machine


def _bench_chaos():
    return bench_module("chaos")


chaos = _bench_chaos()
PROMPT = chaos.PROMPT
SEGMENT_ARGS = list(chaos.SEGMENT_ARGS)
SEGMENT_PARAMS = {"points_per_side": 12, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "filters": "none"}
POOL_KILL_PARAMS = {**SEGMENT_PARAMS, "points_per_side": 24}  # ~1-2 s an image: the kill lands inside a chunk
FAST_PARAMS = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "filters": "none"}


# ---------------------------------------------------------------------------------------------- fixtures


class Cluster:
    """A private Redis (AOF), a directory store, two workers; a client in this process."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.server = chaos.RedisServer(folder / "redis").start()
        self.store = folder / "store"
        self.env = chaos.worker_env(self.server.url(0), self.store)
        self.workers = [chaos.Worker(name, self.env, folder) for name in ("ua-left", "ua-right")]
        for worker in self.workers:
            worker.start()
        self.client = chaos.client_for(self.env)
        chaos.wait_ready(self.client, self.workers)

    def logs(self) -> str:
        return "\n".join(f"--- {w.name} ---\n{w.log_text(3000)}" for w in self.workers)

    def close(self) -> None:
        chaos.stop_all(self.workers)
        self.server.kill()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("unattended"))
    try:
        yield c
    finally:
        c.close()


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, logs: Callable[[], str] = str,
               interval_s: float = 0.1) -> float:
    """Seconds until ``predicate()``; fails with ``what`` and the logs after ``timeout_s``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}\n{logs()}")
        time.sleep(interval_s)
    return time.monotonic() - start


def first(fn: Callable[[], object], timeout_s: float, what: str, logs: Callable[[], str] = str,
          interval_s: float = 0.05):
    """The first truthy value of ``fn()``; fails with ``what`` and the logs after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not (value := fn()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}\n{logs()}")
        time.sleep(interval_s)
    return value


def finish(cluster: Cluster, job: str, timeout_s: float = SLOW):
    """The job's status once it is finished; fails with the logs when it is not after ``timeout_s``."""
    status, poll = chaos.wait_finished(cluster.client, job, timeout_s=timeout_s, poll_s=0.25)
    if status is None or not status.finished:
        pytest.fail(f"job {job} not finished after {timeout_s} s: {status and status.summary()}\n{cluster.logs()}")
    return status


def slip(args: list[str], env: dict[str, str]):
    """The ``slip`` typer app in this process (a fresh interpreter costs seconds here); a click Result."""
    from typer.testing import CliRunner

    from producer.cli import build_app

    slip_env = {k: v for k, v in env.items() if k.startswith("SLIP_") or k.startswith("AWS_")}
    cleared = {k: None for k in os.environ if k.startswith("SLIP_") and k not in slip_env}
    return CliRunner().invoke(build_app(), args, env={**cleared, **slip_env}, catch_exceptions=False)


def new_jobs(cluster: Cluster, known: set[str]) -> set[str]:
    """Ids of the jobs the cluster feeds now, but for ``known``."""
    with cluster.server.client() as r:
        return {m.decode() for m in r.smembers("slip:active")} - known


# ---------------------------------------------------------------------------------------------- heartbeats


def test_heartbeats_stay_on_time_while_the_reapers_feed_a_job(cluster, tmp_path):
    """A job handed to the cluster and fed by nobody else: the workers' reapers send its chunks (the first
    pass of a main process reads Redis only). Meanwhile every heartbeat must come on time (every
    SLIP_DEAD_AFTER / 6): a beat late by SLIP_DEAD_AFTER (10 s) makes a live worker dead to the others, which
    then send its running chunk again."""
    from datetime import datetime

    from jobs.ledger import write_job
    from jobs.model import JobManifest
    from jobs.segment import SegmentSpec
    from jobs.settings import Settings

    defaults, client = Settings(), cluster.client
    items = client.upload(chaos.make_images(tmp_path / "images", 8, seed=10))
    manifest = JobManifest(job_id="reaper-fed", created="2026-01-01T00:00:00+00:00", batch_size=2, total=8,
                           page_size=JobManifest.page_size_for(2),
                           spec=SegmentSpec(prompts=(PROMPT,), sam="tiny-random", clip="tiny-random",
                                            options=FAST_PARAMS))
    write_job(client.store, manifest, items)
    created = datetime.fromisoformat(manifest.created).timestamp()
    with cluster.server.client() as r:
        assert len(r.hkeys("slip:workers")) == 2, r.hkeys("slip:workers")
        client.board.register("reaper-fed", kind="segment", chunks=manifest.chunks, total=8, window=4,
                              created=created)  # nothing sent: the reapers do it
        oldest, deadline = 0.0, time.monotonic() + SLOW
        while time.monotonic() < deadline and not client.status("reaper-fed").finished:
            beats = [json.loads(v)["at"] for v in r.hvals("slip:workers")]
            oldest = max([oldest] + [time.time() - at for at in beats])
            time.sleep(0.05)
    assert client.status("reaper-fed").counts["done"] == 8, client.status("reaper-fed").summary()
    assert oldest <= defaults.dead_after_s - 2 * defaults.heartbeat_s, (
        f"a heartbeat was {oldest:.1f} s old (beats every {defaults.heartbeat_s:.1f} s; dead after "
        f"{defaults.dead_after_s} s)")


# ---------------------------------------------------------------------------------------------- submit and leave


@pytest.fixture(scope="module")
def left_alone(cluster, tmp_path_factory) -> dict:
    """60 images, one per chunk, at most 2 chunks in flight, submitted by `slip submit` (a process, no --wait)
    that exits at once; then only this test's polls of `slip status --json` (in this process) and of the
    client's status watch the job."""
    folder = tmp_path_factory.mktemp("left-alone")
    images = chaos.make_images(folder / "images", 60, seed=1)
    sub = chaos.submit(cluster.env, folder / "images", [*SEGMENT_ARGS, "--batch-size", "1", "--max-in-flight", "2"],
                       kill=False, timeout_s=120)
    done_at_exit = cluster.client.board.r.bitcount(cluster.client.board.key(sub.job_id, "done"))
    at_exit = {**cluster.client.status(sub.job_id).summary(), "done_at_exit": done_at_exit}
    polls, cli = [], []
    deadline = time.monotonic() + 2 * SLOW
    while time.monotonic() < deadline:
        polls.append(cluster.client.status(sub.job_id).summary())
        if len(cli) < 3 and (not cli or len(polls) % 10 == 0):
            done = slip(["status", sub.job_id, "--json"], cluster.env)
            cli.append((done.exit_code, done.stdout))
        if polls[-1]["done"] + polls[-1]["failed"] == len(images):
            break
        time.sleep(0.2)
    return {"submitted": sub, "images": images, "at_exit": at_exit, "polls": polls, "cli": cli,
            "checks": chaos.verify(cluster.client, sub.job_id), "final": cluster.client.status(sub.job_id)}


def test_submit_returns_before_the_job_is_done(left_alone):
    sub, at_exit = left_alone["submitted"], left_alone["at_exit"]
    assert sub.returncode == 0, sub.stderr
    assert at_exit["done_at_exit"] < at_exit["total"] == 60, at_exit  # it did not wait for the job
    assert at_exit["waiting"] > 0, at_exit  # the window holds the rest back


def test_a_job_left_alone_finishes_with_exactly_one_result_per_image(cluster, left_alone):
    final, checks = left_alone["final"], left_alone["checks"]
    assert final.finished and final.counts["done"] == 60, final.summary()
    assert checks["exactly_once"] == 60 and checks["several"] == checks["torn"] == 0, checks
    job = left_alone["submitted"].job_id
    wait_until(lambda: not cluster.client.status(job).active, 10, "the cluster to stop feeding the finished job")


def test_status_of_a_backpressured_job_is_waiting_never_lost(left_alone):
    from jobs.status import STATES

    outputs = []
    for code, stdout in left_alone["cli"]:
        assert code == 0, stdout
        outputs.append(json.loads(stdout))
    assert any(o["waiting"] > 0 for o in outputs), outputs
    for summary in outputs + left_alone["polls"]:
        assert summary["lost"] == 0, summary
        assert sum(summary[s] for s in STATES) == summary["total"] == 60, summary
    assert max(p["running"] + p["queued"] for p in left_alone["polls"]) <= 2  # one image per chunk, 2 in flight


def test_producer_killed_right_after_printing_the_job_id_the_job_still_finishes(cluster, tmp_path):
    chaos.make_images(tmp_path / "images", 6, seed=2)
    sub = chaos.submit(cluster.env, tmp_path / "images", [*SEGMENT_ARGS, "--batch-size", "2"], kill=True)
    board = cluster.client.board
    deadline = time.monotonic() + 20
    while not board.r.exists(board.key(sub.job_id)):
        if time.monotonic() > deadline:
            pytest.fail(f"job {sub.job_id}: its producer printed the job id and was SIGKILLed; the job was never "
                        f"handed to the cluster, so nothing will ever run it: "
                        f"{cluster.client.status(sub.job_id).summary()}")
        time.sleep(0.1)
    status = finish(cluster, sub.job_id)
    assert status.counts["done"] == 6, status.summary()


def test_a_printed_job_id_means_the_cluster_has_the_job(cluster, tmp_path):
    """The same, deterministically: the producer dies (here: raises) the moment the id is handed out."""

    class Died(Exception):
        pass

    def die(job_id: str) -> None:
        printed.append(job_id)
        raise Died(job_id)

    printed: list[str] = []
    paths = chaos.make_images(tmp_path / "images", 2, seed=3)
    with pytest.raises(Died):
        cluster.client.submit_segment([str(p) for p in paths], [PROMPT], FAST_PARAMS, on_job=die)
    (job,) = printed
    status = cluster.client.status(job)
    assert status.active and status.counts["lost"] == 0, (
        f"the job id was printed before the job was handed to the cluster: {status.summary()}")


# ---------------------------------------------------------------------------------------------- failures


def test_a_job_with_default_options_finishes(cluster, tmp_path):
    """SAM's default filter chain (containment) and thresholds: what most users submit."""
    from jobs.status import chunk_letters, chunk_records

    paths = chaos.make_images(tmp_path / "images", 2, seed=4)
    client = cluster.client
    job = client.submit_segment([str(p) for p in paths], [PROMPT], {"points_per_side": 4}, batch_size=2)
    letters = first(lambda: chunk_letters(client.store, job).get(0), SLOW, "the chunk's first record", cluster.logs)
    reasons = [o.reason for record in chunk_records(client.store, job) for o in record.items]
    assert letters == "dd", f"the images failed: {reasons}"


def test_retry_is_for_permanent_failures_and_reruns_only_them(cluster, tmp_path):
    from jobs.status import chunk_records

    folder = tmp_path / "images"
    chaos.make_images(folder, 3, seed=5)
    (folder / "img_00003.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    client = cluster.client
    job = client.submit_segment([str(folder)], [PROMPT], FAST_PARAMS, batch_size=2)
    first = finish(cluster, job)
    assert first.counts["done"] == 3 and first.counts["failed"] == 1, first.summary()
    assert first.retryable == 0  # failed for good: the cluster does not re-send it by itself
    ((index, name, reason),) = client.failed_units(first)
    assert name == "img_00003.png" and reason and "\n" not in reason
    shown = json.loads(slip(["status", job, "--json"], cluster.env).stdout)
    assert shown["failures"] == [{"reason": reason, "error": "ImageError", "permanent": True, "count": 1,
                                  "examples": [{"index": index, "name": name}]}], shown
    before = {r.chunk: r for r in chunk_records(client.store, job)}

    done = slip(["retry", job], cluster.env)
    assert done.exit_code == 0 and "sent 1 failed unit(s) again" in done.stdout, done.stdout
    again = finish(cluster, job)
    after = {r.chunk: r for r in chunk_records(client.store, job)}
    assert again.counts["done"] == 3 and again.counts["failed"] == 1, again.summary()
    assert client.failed_units(again) == [(index, name, reason)]  # the same one-line reason
    assert after[0] == before[0], "a chunk without failures ran again"
    assert after[1].finished != before[1].finished, "the failed image's chunk did not run again"
    outcomes = {o.index: o for o in after[1].items}
    assert outcomes[2].state == "done" and outcomes[2].how == "existing", outcomes[2]  # not recomputed


# ---------------------------------------------------------------------------------------------- dead worker


@pytest.fixture(scope="module")
def dead_worker(cluster, tmp_path_factory) -> dict:
    """48 images, 4 per chunk, 8 chunks in flight; once a chunk runs, its worker (main process and pool) is
    SIGKILLed; how long until that chunk's complete record is in the store."""
    from jobs.status import chunk_letters, chunk_records

    folder = tmp_path_factory.mktemp("dead-worker")
    paths = chaos.make_images(folder / "images", 48, seed=6)
    client, r = cluster.client, cluster.server.client()
    job = client.submit_segment([str(p) for p in paths], [PROMPT], SEGMENT_PARAMS, batch_size=4, max_in_flight=8)
    victim, chunk = first(lambda: chaos.holder_of(r, job, cluster.workers, pool=False), SLOW,
                          "a chunk running on a worker", cluster.logs)
    victim.kill_main()
    killed = time.monotonic()
    size = len(range(chunk * 4, min(chunk * 4 + 4, 48)))
    wait_until(lambda: chunk_letters(client.store, job).get(chunk) == "d" * size, 120,
               f"chunk {chunk} of the killed worker {victim.name} to complete", cluster.logs, interval_s=0.2)
    seconds = time.monotonic() - killed
    status = finish(cluster, job, timeout_s=120)
    (record,) = chunk_records(client.store, job, [chunk])
    result = {"job": job, "chunk": chunk, "victim": victim.name, "seconds": seconds, "status": status,
              "checks": chaos.verify(client, job), "attempt": record.attempt,
              "sent_again": len(re.findall(rf"job {job} chunk {chunk}: sending again", _logs(cluster.workers))),
              "reapers": chaos.log_counts(cluster.workers)}
    victim.start()  # as a process manager would
    chaos.wait_ready(client, [victim])  # (a worker loading its models holds the messages it reserved)
    r.close()
    return result


def test_a_dead_workers_chunk_finishes_elsewhere_within_60_s(dead_worker):
    print(f"chunk {dead_worker['chunk']} of the killed worker {dead_worker['victim']} complete "
          f"{dead_worker['seconds']:.1f} s after the kill")
    assert dead_worker["seconds"] < 60, dead_worker
    status, checks = dead_worker["status"], dead_worker["checks"]
    assert status.counts["done"] == 48, status.summary()
    assert checks["exactly_once"] == 48 and checks["several"] == checks["torn"] == 0, checks


def test_a_dead_workers_chunk_is_sent_again_once(dead_worker):
    assert dead_worker["sent_again"] == 1 and dead_worker["attempt"] == 1, (
        f"chunk {dead_worker['chunk']} of the one dead worker was sent again {dead_worker['sent_again']} times "
        f"(reapers: {dead_worker['reapers']})")


def _logs(workers) -> str:
    return "".join(w.log_path.read_text(errors="replace") for w in workers if w.log_path.exists())


# ---------------------------------------------------------------------------------------------- pool process killed mid-chunk


def test_a_killed_pool_processs_chunk_is_sent_again_by_its_worker_and_running_stays_true(cluster, tmp_path):
    """The OOM killer takes the pool process running a chunk while many chunks wait: its worker's reaper sends
    the chunk again (attempt 1, ahead of the waiting chunks: test_broker_priority.py) on its next beat, the
    message Celery put back is stale when it comes up, and `running` never counts more chunks than there are
    pool processes (2 workers x 1)."""
    from jobs.status import chunk_records

    paths = chaos.make_images(tmp_path / "images", 16, seed=12)
    client, r = cluster.client, cluster.server.client()
    job = client.submit_segment([str(p) for p in paths], [PROMPT], POOL_KILL_PARAMS, batch_size=1, max_in_flight=12)
    victim, _ = first(lambda: chaos.holder_of(r, job, cluster.workers, pool=True), SLOW,
                      "a chunk running on a worker", cluster.logs)
    assert victim.kill_pool()
    running = []
    while not (status := client.status(job)).finished:
        running.append(status.counts["running"])
        time.sleep(0.1)
    r.close()
    checks = chaos.verify(client, job)
    assert status.counts["done"] == 16 and checks["exactly_once"] == 16 and checks["torn"] == 0, checks
    # the chunk the pool process held when it died (the one seen running may have finished just before)
    sent = re.findall(rf"job {job} chunk (\d+): sending again \(attempt 1\): its pool process \d+ died",
                      _logs(cluster.workers))
    assert len(sent) == 1, f"chunks sent again after one pool kill: {sent}\n{cluster.logs()}"
    (record,) = chunk_records(client.store, job, [int(sent[0])])
    assert record.attempt == 1, f"chunk {sent[0]} was finished by attempt {record.attempt}\n{cluster.logs()}"
    assert max(running) <= 2, f"`running` counted {max(running)} images with 2 pool processes"


# ---------------------------------------------------------------------------------------------- Redis restart


def test_redis_sigkilled_mid_job_and_restarted_the_job_finishes_and_wait_exits_0(cluster, tmp_path):
    chaos.make_images(tmp_path / "images", 24, seed=7)
    known = new_jobs(cluster, set())
    result: list = []
    args = [*SEGMENT_ARGS, "--batch-size", "2", "--max-in-flight", "4", "--wait"]
    follower = threading.Thread(target=lambda: result.append(
        chaos.submit(cluster.env, tmp_path / "images", args, kill=False, timeout_s=240, log=tmp_path / "submit.err")))
    follower.start()
    (job,) = first(lambda: new_jobs(cluster, known), SLOW, "the job to be registered", cluster.logs)
    r = cluster.server.client()
    wait_until(lambda: r.bitcount(f"slip:job:{job}:done") >= 2 and bool(chaos.running(r, job)), SLOW,
               "two chunks done and one running", cluster.logs)
    r.close()
    cluster.server.kill()  # mid-task, SIGKILL: only the AOF survives
    time.sleep(6.0)
    cluster.server.start()  # same port, same AOF
    follower.join(timeout=240)
    assert result, f"`slip submit --wait` did not exit within 240 s\n{cluster.logs()}"
    (sub,) = result
    assert sub.returncode == 0, f"{sub.stderr[-3000:]}\n{cluster.logs()}"
    status = cluster.client.status(job)
    checks = chaos.verify(cluster.client, job)
    assert status.finished and status.counts["done"] == 24, status.summary()
    assert checks["exactly_once"] == 24 and checks["several"] == checks["torn"] == 0, checks
    assert all(w.alive for w in cluster.workers), "a worker exited instead of reconnecting"


# ---------------------------------------------------------------------------------------------- S3 outage


@pytest.fixture(scope="module")
def s3_cluster(cluster, tmp_path_factory):
    """One worker whose store is S3 (moto on loopback), on db 1 of the private Redis."""
    from s3_server import S3Server

    folder = tmp_path_factory.mktemp("s3")
    with S3Server() as s3, pytest.MonkeyPatch.context() as mp:
        for key, value in s3.env.items():
            mp.setenv(key, value)
        env = {**chaos.worker_env(cluster.server.url(1), s3.store_url("unattended")), **s3.env}
        worker = chaos.Worker("ua-s3", env, folder).start()
        try:
            client = chaos.client_for(env)
            chaos.wait_ready(client, [worker])
            yield {"s3": s3, "env": env, "worker": worker, "client": client, "folder": folder}
        finally:
            worker.stop()


def test_s3_outage_mid_job_the_job_finishes_without_a_retry(s3_cluster):
    s3, client, worker = s3_cluster["s3"], s3_cluster["client"], s3_cluster["worker"]
    paths = chaos.make_images(s3_cluster["folder"] / "images", 16, seed=8)
    job = client.submit_segment([str(p) for p in paths], [PROMPT], SEGMENT_PARAMS, batch_size=1, max_in_flight=4)
    logs = lambda: worker.log_text(4000)  # noqa: E731
    wait_until(lambda: client.board.r.bitcount(client.board.key(job, "done")) >= 3, SLOW, "three images done", logs)
    s3.stop()
    time.sleep(10.0)
    s3.start()
    status, _ = chaos.wait_finished(client, job, timeout_s=120, poll_s=0.5)
    assert status is not None and status.finished and status.counts["done"] == 16, (
        f"{status and status.summary()}\n{logs()}")
    checks = chaos.verify(client, job)
    assert checks["exactly_once"] == 16 and checks["several"] == checks["torn"] == 0, checks
    assert "store s3://" in worker.log_path.read_text(errors="replace"), "the outage was not felt by the worker"


# ---------------------------------------------------------------------------------------------- pool process killed


def test_a_pool_process_has_time_to_load_the_models():
    """A new pool process loads the models (worker_process_init) before it reports up to Celery, which kills
    it when that takes longer than worker_proc_alive_timeout (Celery's default: 4 s; a model load takes
    seconds to minutes)."""
    from jobs.settings import Settings
    from worker.app import create_app

    assert create_app(Settings(), worker=True).conf.worker_proc_alive_timeout >= 60


def test_a_worker_whose_pool_process_was_killed_serves_again(cluster, tmp_path):
    """The OOM killer takes both workers' pool processes; Celery forks new ones, which load the models; the
    next job must run (and no new pool process may be killed for being slow to start)."""
    before = {w.name: w.log_text(10**7).count("Timed out waiting for UP message") for w in cluster.workers}
    for worker in cluster.workers:
        assert worker.kill_pool(), f"{worker.name} has no pool process"
    paths = chaos.make_images(tmp_path / "images", 2, seed=9)
    job = cluster.client.submit_segment([str(p) for p in paths], [PROMPT], FAST_PARAMS, batch_size=1)
    status, _ = chaos.wait_finished(cluster.client, job, timeout_s=SLOW, poll_s=0.5)
    killed = {w.name: w.log_text(10**7).count("Timed out waiting for UP message") - before[w.name]
              for w in cluster.workers}
    assert not any(killed.values()), (
        f"new pool processes killed while loading the models, per worker: {killed}; job: "
        f"{status and status.summary()}")
    assert status is not None and status.counts["done"] == 2, status and status.summary()
