"""Fault tolerance with real processes: a private ``redis-server`` per test (AOF on, so it can be killed
and restarted), real ``celery -A worker worker`` subprocesses, the ``slip`` CLI, tiny-random models.

* a worker SIGKILLed mid-job (main process and pool child, as when a machine dies): it stops beating, and
  ``SLIP_DEAD_AFTER`` seconds later the live worker's reaper sends its chunk again; every image completes
  exactly once (no result written twice), nothing is lost or torn. The visibility timeout (the broker's
  backstop) is set far beyond the test, so only the heartbeat can rescue the chunk;
* Redis SIGKILLed mid-batch and restarted on the same port: the worker reconnects, the batch completes;
* two workers: both take work, the batch completes;
* a poison chunk: a chunk whose worker process dies on every attempt (here the test plays the OOM killer:
  once a new attempt of the chunk holds it in Redis, ``slip:job:<id>:running``, it SIGKILLs the pool
  process mid-model; the worker's reaper sends the chunk again at once) is failed for good without running
  once it was sent ``SLIP_MAX_ATTEMPTS`` times; the worker lives on and serves the next job.

Jobs are made slow enough to be caught mid-flight with a finer SAM point grid (``--points-per-side 12``),
a real request parameter: no sleeps or test hooks in production code. Short heartbeats come from the
environment (``SLIP_DEAD_AFTER``, a beat every sixth of it), as a deployment would set them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import redis
from PIL import Image

from queue_helpers import (
    all_done,
    bench_module,
    client_for,
    invoke_cli,
    items_of,
    job_id_from,
    make_images,
    node_name,
    outcomes,
    queue_env,
    records,
    start_worker,
    wait_worker_ready,
)

pytestmark = pytest.mark.integration

SLOW_ARGS = ["--points-per-side", "12", "--batch-size", "1", "--render"]  # about a second per image
POISON_ARGS = ["--points-per-side", "64", "--batch-size", "1"]  # seconds per attempt: room to catch it running
RESULT_FILES = {"segments.json", "mask_0.png", "overlay_0.png"}
PROMPT = "a red box"
DEAD_AFTER_S = 3.0  # SLIP_DEAD_AFTER: a worker silent this long is dead


# ---------------------------------------------------------------------------------------------- fixtures


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """A redis-server this test owns: its own port and directory, AOF fsynced on every write."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.folder / "redis.log", "ab")
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(self.folder)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                if client.ping():
                    break
            except (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError):
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"redis-server on port {self.port} did not start")
                time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown save, only what the AOF already holds survives."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


@pytest.fixture
def private_redis(tmp_path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: run `bash scripts/setup.sh`")
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def workers(tmp_path) -> Iterator[Callable[..., subprocess.Popen]]:
    """Start real workers (logs under tmp_path); every one is stopped (group SIGKILL) at the end."""
    started: list[subprocess.Popen] = []

    def start(env: dict[str, str], *names: str) -> subprocess.Popen | list[subprocess.Popen]:
        processes = [start_worker(env, ("gpu", "cpu"), name, log_path=tmp_path / f"{name}.log") for name in names]
        started.extend(processes)
        try:
            for name, process in zip(names, processes):
                wait_worker_ready(env, name, process=process, timeout_s=120)
        except RuntimeError as e:
            pytest.fail(f"{e}\n{worker_logs(tmp_path)}")
        return processes[0] if len(processes) == 1 else processes

    yield start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def fault_env(tmp_path: Path, server: PrivateRedis, **overrides: str) -> dict[str, str]:
    timing = {"SLIP_DEAD_AFTER": str(DEAD_AFTER_S), "SLIP_LOST_AFTER": "3", "SLIP_TASK_TIME_LIMIT": "60",
              "SLIP_VISIBILITY_TIMEOUT": "600"}
    return queue_env(tmp_path / "store", db=0, port=server.port, **{**timing, **overrides})


# ---------------------------------------------------------------------------------------------- helpers


def worker_logs(folder: Path) -> str:
    parts = []
    for log in sorted(folder.glob("*.log")):
        parts.append(f"--- {log.name} ---\n{log.read_text(errors='replace')[-2500:]}")
    return "\n".join(parts)


def submit(env: dict[str, str], folder: Path, args: list[str]) -> str:
    """`slip submit segment FOLDER --prompt ...` without --wait: returns once the cluster has the job.
    (The CLI's typer app in this process: a fresh interpreter costs seconds on a loaded 2-core machine,
    and the end-to-end tests already run the console command as a real process.)"""
    done = invoke_cli(["submit", "segment", str(folder), "--prompt", PROMPT, *args], env)
    assert done.exit_code == 0, f"{done.stdout}{done.stderr}{done.exception!r}"
    return job_id_from(done.stdout)


def status(env: dict[str, str], job: str) -> dict:
    """`slip status JOB --json`."""
    done = invoke_cli(["status", job, "--json"], env)
    assert done.exit_code == 0, f"{done.stdout}{done.stderr}{done.exception!r}"
    return json.loads(done.stdout)


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str, folder: Path, interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}\n{worker_logs(folder)}")
        time.sleep(interval_s)


def wait_job_done(env: dict[str, str], job: str, total: int, folder: Path, timeout_s: float) -> dict:
    """Poll the job's status (client in this process) until every image is done, then return what
    `slip status JOB --json` says; fail with the logs when it does not finish in time."""
    client = client_for(env)
    deadline = time.monotonic() + timeout_s
    while True:
        job_status = client.status(job)
        if job_status.counts["done"] == total:
            return status(env, job)
        if time.monotonic() > deadline:
            failures = client.failures(job_status) if job_status.counts["failed"] else []
            pytest.fail(f"job {job} did not finish in {timeout_s} s: {job_status.counts} {failures}\n"
                        f"{worker_logs(folder)}")
        time.sleep(0.2)


def finished(job: str, total: int) -> dict:
    """What `slip status --json` says of a finished job whose images are all done."""
    return {"job_id": job, "kind": "segment", "total": total, **all_done(total), "active": False, "retryable": 0,
            "failures": []}


def result_files(store: Path) -> list[Path]:
    return list(store.glob("results/*/*/segments.json"))


def assert_results_complete(env: dict[str, str], job: str, images: list[Path]) -> None:
    """Every image has exactly the result files of one prompt, each readable and of the image's size."""
    client = client_for(env)
    store = Path(env["SLIP_STORE"])
    found = outcomes(client.store, job)
    items = items_of(client.store, job)
    assert len(items) == len(images) == len(found)
    sources = {p.name: p for p in images}
    for item in items:
        outcome = found[item.index]
        assert outcome.state == "done", (item.name, outcome)
        folder = store / outcome.result_key
        assert {p.name for p in folder.iterdir()} == RESULT_FILES, (item.name, sorted(folder.iterdir()))
        doc = json.loads((folder / "segments.json").read_text())
        with Image.open(sources[item.name]) as source:
            size = source.size
        for name in ("mask_0.png", "overlay_0.png"):
            with Image.open(folder / name) as png:
                png.load()
                assert png.size == size, (item.name, name, png.size, size)
        assert doc["matches"][0]["prompt"] == PROMPT
    assert not any(".tmp" in key for key in client.store.list("results")), "no temporary file is a result"


def running_chunk(client, job: str) -> bool:
    """Whether a worker holds one of the job's chunks right now (it counted the delivery and started)."""
    return bool(client.board.view(job).running)


class FirstWrites:
    """Background poll of the store: the (inode, mtime) each segments.json had when first seen."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.seen: dict[Path, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            time.sleep(0.02)

    def poll(self) -> None:
        for path in result_files(self.store):
            if path not in self.seen:
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                self.seen[path] = (st.st_ino, st.st_mtime_ns)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()


# ---------------------------------------------------------------------------------------------- tests


def test_worker_killed_mid_job_every_image_completes_exactly_once(private_redis, workers, tmp_path):
    env = fault_env(tmp_path, private_redis)
    store = Path(env["SLIP_STORE"])
    images = make_images(tmp_path / "images", 10)
    first = workers(env, "killed")
    writes = FirstWrites(store)
    job = submit(env, tmp_path / "images", SLOW_ARGS)

    # mid-job: some results written, one chunk running (its message reserved, not acknowledged)
    client = client_for(env)
    wait_for(lambda: len(writes.seen) >= 2 and running_chunk(client, job), 90, "two results and a running chunk",
             tmp_path)
    os.killpg(first.pid, signal.SIGKILL)  # the whole worker: main process and pool child, like a dead machine
    first.wait()
    time.sleep(0.2)
    held = client.board.view(job).running
    assert 2 <= len(writes.seen) < len(images), "the kill must land mid-batch"
    assert held, "a chunk was held by the killed worker"

    # the dead worker stops beating; the new worker's reaper sends its chunk again (the visibility timeout,
    # 600 s, cannot have brought the message back)
    workers(env, "rescuer")
    assert wait_job_done(env, job, len(images), tmp_path, timeout_s=120) == finished(job, 10)
    writes.stop()
    assert_results_complete(env, job, images)
    # exactly once: no segments.json was ever replaced after it first appeared
    for path, (inode, mtime) in writes.seen.items():
        st = path.stat()
        assert (st.st_ino, st.st_mtime_ns) == (inode, mtime), f"{path} was written twice"
    assert len(writes.seen) == len(images)
    # a SIGKILL can interrupt at most one write: its temporary file is never listed as a key
    leftovers = [p for p in store.rglob("*") if p.is_file() and ".tmp" in p.parts]
    assert len(leftovers) <= 1, leftovers
    # every chunk has one final record; the new worker finished what the dead one left
    chunk_records = records(client.store, job)
    assert [r.chunk for r in chunk_records] == list(range(10)) and {r.letters for r in chunk_records} == {"d"}
    hosts = {r.worker for r in chunk_records}
    assert hosts <= {node_name("killed"), node_name("rescuer")} and node_name("rescuer") in hosts, hosts
    for chunk in held:
        assert chunk_records[chunk].worker == node_name("rescuer")
    resent = [line for line in (tmp_path / "rescuer.log").read_text(errors="replace").splitlines()
              if f"job {job} chunk" in line and f"worker {node_name('killed')} stopped beating" in line]
    assert {f"job {job} chunk {chunk}: sending again" for chunk in held} <= {line.split("] ", 1)[1].split(" (")[0]
                                                                             for line in resent}, worker_logs(tmp_path)


def test_redis_restarted_mid_batch_worker_reconnects_and_batch_completes(private_redis, workers, tmp_path):
    env = fault_env(tmp_path, private_redis)
    store = Path(env["SLIP_STORE"])
    images = make_images(tmp_path / "images", 10)
    worker = workers(env, "survivor")
    job = submit(env, tmp_path / "images", SLOW_ARGS)
    client = client_for(env)
    wait_for(lambda: len(result_files(store)) >= 2 and running_chunk(client, job), 90,
             "two results and a running chunk", tmp_path)

    private_redis.kill()  # mid-task, SIGKILL: only the AOF survives
    assert len(result_files(store)) < len(images), "Redis must die mid-batch"
    time.sleep(2)
    private_redis.start()  # same port, same AOF: queued messages and the job's state come back

    assert wait_job_done(env, job, len(images), tmp_path, timeout_s=120) == finished(job, 10)
    assert worker.poll() is None, "the worker must reconnect, not exit"
    assert_results_complete(env, job, images)
    assert "Connection to broker lost" in (tmp_path / "survivor.log").read_text(errors="replace")


def test_two_workers_both_take_work_and_the_batch_finishes(private_redis, workers, tmp_path):
    env = fault_env(tmp_path, private_redis)
    images = make_images(tmp_path / "images", 12)
    workers(env, "left", "right")
    job = submit(env, tmp_path / "images", SLOW_ARGS)
    assert wait_job_done(env, job, len(images), tmp_path, timeout_s=120) == finished(job, 12)
    assert_results_complete(env, job, images)
    by_worker: dict[str, int] = {}
    for record in records(client_for(env).store, job):
        by_worker[record.worker] = by_worker.get(record.worker, 0) + len(record.items)
    assert set(by_worker) == {node_name("left"), node_name("right")}, by_worker
    assert sum(by_worker.values()) == len(images)


class PoolKiller(threading.Thread):
    """The OOM killer of a poison chunk: each time a new attempt of a chunk holds it in Redis (its running mark
    in the documented ``slip:job:<id>:running`` hash, written as the task starts, before the model runs),
    SIGKILL the worker's pool process, up to ``times`` times."""

    def __init__(self, server: PrivateRedis, worker_pid: int, *, times: int) -> None:
        super().__init__(daemon=True)
        self.redis = server.client()
        self.worker_pid = worker_pid
        self.times = times
        self.kills: list[int] = []
        self._stop_event = threading.Event()
        self.start()

    def run(self) -> None:
        while not self._stop_event.is_set():
            attempts = [json.loads(v)["attempt"] for key in self.redis.scan_iter("slip:job:*:running")
                        for v in self.redis.hvals(key)]
            if attempts and max(attempts) >= len(self.kills) and len(self.kills) < self.times:
                for pid in bench_module("processes").children_of(self.worker_pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:  # it exited between the listing and the kill
                        pass
                self.kills.append(max(attempts))
            time.sleep(0.005)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


def test_poison_chunk_stops_after_max_attempts_and_is_failed_for_good(private_redis, workers, tmp_path):
    max_attempts = 2
    env = fault_env(tmp_path, private_redis, SLIP_MAX_ATTEMPTS=str(max_attempts))
    make_images(tmp_path / "poison", 1, seed=7)
    make_images(tmp_path / "good", 1, seed=8)
    worker = workers(env, "victim")
    killer = PoolKiller(private_redis, worker.pid, times=max_attempts)
    client = client_for(env)
    try:
        job = submit(env, tmp_path / "poison", POISON_ARGS)
        wait_for(lambda: client.status(job).counts["failed"] == 1, 150, "the poison chunk to be recorded failed",
                 tmp_path, interval_s=0.2)
    finally:
        killer.stop()

    assert killer.kills == [0, 1], killer.kills  # killed on its attempts 0 and 1; the third send is poison
    summary = status(env, job)  # what `slip status` shows
    assert summary["failed"] == 1 and summary["retryable"] == 0 and not summary["active"]
    assert [(g["error"], g["count"]) for g in summary["failures"]] == [("Poison", 1)], summary
    (outcome,) = outcomes(client.store, job).values()
    assert outcome.state == "failed" and outcome.permanent and outcome.error == "Poison"
    assert outcome.reason.startswith(f"poison: sent {max_attempts} times, never finished")
    assert f"SLIP_MAX_ATTEMPTS={max_attempts}" in outcome.reason
    assert not list(Path(env["SLIP_STORE"]).glob("proposals/*")), "the poison chunk never got to write anything"
    # the worker lives on and serves the next job
    assert worker.poll() is None
    good = submit(env, tmp_path / "good", ["--batch-size", "1", "--points-per-side", "4"])
    wait_job_done(env, good, 1, tmp_path, timeout_s=90)
