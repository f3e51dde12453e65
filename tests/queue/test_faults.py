"""Fault tolerance with real processes: a private ``redis-server`` per test (AOF on, so it can be killed
and restarted), real ``celery -A worker worker`` subprocesses, the ``slip`` CLI, tiny-random models.

* a worker SIGKILLed mid-job (main process and pool child, as when a machine dies): once a new worker
  runs, every image completes exactly once; nothing is lost, duplicated or torn;
* Redis SIGKILLed mid-batch and restarted on the same port: the worker reconnects, the batch completes;
* two workers: both take work, the batch completes;
* a poison message: a task whose worker process dies on every delivery (here the test plays the OOM
  killer: once Celery reports the task started and the task has counted its delivery in Redis, the
  documented ``slip:deliveries:<task id>:<retry>`` counter, it SIGKILLs the pool process mid-model) stops
  after ``SLIP_MAX_DELIVERIES`` deliveries and is recorded as failed; the worker lives on.

Jobs are made slow enough to be caught mid-flight with a finer SAM point grid (``--points-per-side 32``),
a real request parameter: no sleeps or test hooks in production code. Short visibility timeouts (6 s)
come from the environment (``SLIP_VISIBILITY_TIMEOUT``), as a deployment would set them.
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

from queue_helpers import invoke_cli, job_id_from, make_images, node_name, queue_env, start_worker, wait_worker_ready

pytestmark = pytest.mark.integration

VISIBILITY_S = 6  # SLIP_VISIBILITY_TIMEOUT: an unacked message is redelivered after this
TIME_LIMIT_S = 5  # SLIP_TASK_TIME_LIMIT: must stay below the visibility timeout
SLOW_ARGS = ["--points-per-side", "32", "--batch-size", "1"]  # ~0.4 s per image on one core
POISON_ARGS = ["--points-per-side", "48", "--batch-size", "1"]
RESULT_FILES = {"segments.json", "mask_0.png", "overlay_0.png"}
PROMPT = "a red box"


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
    limits = {"SLIP_VISIBILITY_TIMEOUT": str(VISIBILITY_S), "SLIP_TASK_TIME_LIMIT": str(TIME_LIMIT_S)}
    return queue_env(tmp_path / "store", db=0, port=server.port, **{**limits, **overrides})


# ---------------------------------------------------------------------------------------------- helpers


def worker_logs(folder: Path) -> str:
    parts = []
    for log in sorted(folder.glob("*.log")):
        parts.append(f"--- {log.name} ---\n{log.read_text(errors='replace')[-2500:]}")
    return "\n".join(parts)


def submit(env: dict[str, str], folder: Path, args: list[str]) -> str:
    """`slip submit segment FOLDER --prompt ...` without --wait: returns once every image is enqueued.
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


def client_for(env: dict[str, str]):
    from producer.client import QueueClient
    from worker.settings import Settings

    return QueueClient(Settings.from_env(env))


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
        counts = job_status.counts
        if counts["done"] == total:
            return status(env, job)
        if time.monotonic() > deadline:
            unfinished = [f"item {i.index}: {i.state} ({i.reason})" for i in job_status.items if i.state != "done"]
            pytest.fail(f"job {job} did not finish in {timeout_s} s: {counts}\n" + "\n".join(unfinished)
                        + f"\n{worker_logs(folder)}")
        time.sleep(0.2)


def result_dirs(store: Path) -> dict[str, Path]:
    """Result key -> folder, for every folder under results/ that has any file."""
    return {str(p.parent.relative_to(store)): p.parent for p in store.glob("results/*/*/*") if p.is_file()}


def temp_files(store: Path) -> list[Path]:
    return [p for p in store.rglob(".tmp-*")]


def final_task_results(env: dict[str, str], job: str) -> dict[str, dict]:
    """Task id -> stored task result (state SUCCESS), for every task the job enqueued."""
    from worker.ledger import task_records

    client = client_for(env)
    out = {}
    for record in task_records(client.store, job):
        meta = client.app.backend.get_task_meta(record.task_id)
        assert meta["status"] == "SUCCESS", (record.task_id, meta["status"], meta.get("result"))
        out[record.task_id] = meta["result"]
    return out


def assert_results_complete(env: dict[str, str], job: str, images: list[Path]) -> None:
    """Every image has exactly the result files of one prompt, each readable and of the image's size."""
    client = client_for(env)
    manifest = client.status(job).manifest
    store = Path(env["SLIP_STORE"])
    assert len(manifest.items) == len(images)
    for item in manifest.items:
        folder = store / manifest.spec.result_key(item)
        names = {p.name for p in folder.iterdir()}
        assert names - {n for n in names if n.startswith(".tmp-")} == RESULT_FILES, (item.name, names)
        doc = json.loads((folder / "segments.json").read_text())
        with Image.open(item.name) as source:
            size = source.size
        for name in ("mask_0.png", "overlay_0.png"):
            with Image.open(folder / name) as png:
                png.load()
                assert png.size == size, (item.name, name, png.size, size)
        assert doc["matches"][0]["prompt"] == PROMPT


def running_task(client, job: str) -> bool:
    """Whether one of the job's tasks is in state STARTED (a worker is in the middle of it)."""
    from worker.ledger import task_records, task_states

    ids = [r.task_id for r in task_records(client.store, job)]
    return "STARTED" in task_states(client.app, ids).values()


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
        for path in self.store.glob("results/*/*/segments.json"):
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


def pool_children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (the prefork pool of a worker's main process)."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry.name))
    return children


# ---------------------------------------------------------------------------------------------- tests


def test_worker_killed_mid_job_every_image_completes_exactly_once(private_redis, workers, tmp_path):
    env = fault_env(tmp_path, private_redis)
    store = Path(env["SLIP_STORE"])
    images = make_images(tmp_path / "images", 10)
    first = workers(env, "killed")
    writes = FirstWrites(store)
    job = submit(env, tmp_path / "images", SLOW_ARGS)

    # mid-job: some results written, one task running (its message reserved, not acknowledged)
    client = client_for(env)
    wait_for(lambda: len(writes.seen) >= 2 and running_task(client, job), 60, "two results and a running task",
             tmp_path)
    os.killpg(first.pid, signal.SIGKILL)  # the whole worker: main process and pool child, like a dead machine
    first.wait()
    killed_at = time.monotonic()
    time.sleep(0.2)
    assert 2 <= len(writes.seen) < len(images), "the kill must land mid-batch"
    assert private_redis.client().hlen("unacked") >= 1, "the killed worker held no unacknowledged message"

    # the dead worker's reserved message becomes visible again after the visibility timeout
    time.sleep(max(0.0, killed_at + VISIBILITY_S + 0.5 - time.monotonic()))
    workers(env, "rescuer")
    counts = wait_job_done(env, job, len(images), tmp_path, timeout_s=90)
    writes.stop()

    assert counts == {"job_id": job, "total": 10, "done": 10, "failed": 0, "pending": 0, "lost": 0}, counts
    assert_results_complete(env, job, images)
    # exactly once: no segments.json was ever replaced after it first appeared
    for path, (inode, mtime) in writes.seen.items():
        st = path.stat()
        assert (st.st_ino, st.st_mtime_ns) == (inode, mtime), f"{path} was written twice"
    assert len(writes.seen) == len(images)
    # a SIGKILL can interrupt at most one atomic write: its hidden temp file is never read as a result
    leftovers = temp_files(store)
    assert len(leftovers) <= 1, leftovers
    assert not any(".tmp-" in key for key in client.store.list("results"))
    # every task ended SUCCESS; the new worker finished what the dead one left
    results = final_task_results(env, job)
    hosts = {r["worker"] for r in results.values()}
    assert hosts <= {node_name("killed"), node_name("rescuer")} and node_name("rescuer") in hosts, hosts
    statuses = [item["status"] for r in results.values() for item in r["items"]]
    assert len(statuses) == len(images) and set(statuses) <= {"done", "skipped"}, statuses


def test_redis_restarted_mid_batch_worker_reconnects_and_batch_completes(private_redis, workers, tmp_path):
    env = fault_env(tmp_path, private_redis)
    store = Path(env["SLIP_STORE"])
    images = make_images(tmp_path / "images", 10)
    worker = workers(env, "survivor")
    job = submit(env, tmp_path / "images", SLOW_ARGS)
    client = client_for(env)
    wait_for(lambda: len(list(store.glob("results/*/*/segments.json"))) >= 2 and running_task(client, job),
             60, "two results and a running task", tmp_path)

    private_redis.kill()  # mid-task, SIGKILL: only the AOF survives
    done_during_outage = len(list(store.glob("results/*/*/segments.json")))
    assert done_during_outage < len(images), "Redis must die mid-batch"
    time.sleep(2)
    private_redis.start()  # same port, same AOF: queued messages and task states come back

    counts = wait_job_done(env, job, len(images), tmp_path, timeout_s=90)
    assert counts["failed"] == counts["pending"] == counts["lost"] == 0, counts
    assert worker.poll() is None, "the worker must reconnect, not exit"
    assert_results_complete(env, job, images)
    assert "Connection to broker lost" in (tmp_path / "survivor.log").read_text(errors="replace")


def test_two_workers_both_take_work_and_the_batch_finishes(private_redis, workers, tmp_path):
    env = fault_env(tmp_path, private_redis)
    images = make_images(tmp_path / "images", 12)
    workers(env, "left", "right")
    job = submit(env, tmp_path / "images", SLOW_ARGS)
    counts = wait_job_done(env, job, len(images), tmp_path, timeout_s=90)
    assert counts["failed"] == counts["lost"] == 0
    assert_results_complete(env, job, images)
    results = final_task_results(env, job)
    by_worker: dict[str, int] = {}
    for result in results.values():
        by_worker[result["worker"]] = by_worker.get(result["worker"], 0) + len(result["items"])
    assert set(by_worker) == {node_name("left"), node_name("right")}, by_worker
    assert sum(by_worker.values()) == len(images)


def test_poison_message_stops_after_max_deliveries_and_is_recorded_failed(private_redis, workers, tmp_path):
    max_deliveries = 2
    # a killed pool process's task is requeued at once (reject on worker lost): no visibility wait here,
    # so generous limits keep a loaded machine from turning the slow image into a time-limit failure
    env = fault_env(tmp_path, private_redis, SLIP_MAX_DELIVERIES=str(max_deliveries),
                    SLIP_TASK_TIME_LIMIT="60", SLIP_VISIBILITY_TIMEOUT="90")
    make_images(tmp_path / "poison", 1, seed=7)
    make_images(tmp_path / "good", 1, seed=8)
    worker = workers(env, "victim")
    killer = PoolKiller(private_redis, worker.pid, times=max_deliveries)
    try:
        job = submit(env, tmp_path / "poison", POISON_ARGS)
        client = client_for(env)
        wait_for(lambda: client.status(job).counts["failed"] == 1, 90, "the poison message to be recorded failed",
                 tmp_path, interval_s=0.2)
    finally:
        killer.stop()

    (task_id,) = final_task_ids(env, job)
    assert len(killer.kills) == max_deliveries
    deliveries = int(private_redis.client().get(f"slip:deliveries:{task_id}:0") or 0)
    assert deliveries == max_deliveries + 1, f"{deliveries} deliveries"
    assert status(env, job)["failed"] == 1  # what `slip status` shows
    item = client.status(job).items[0]
    assert item.state == "failed" and item.error == "PoisonMessage"
    assert item.reason.startswith("poison:") and f"SLIP_MAX_DELIVERIES={max_deliveries}" in item.reason
    assert client.app.backend.get_task_meta(task_id)["status"] == "FAILURE"
    # the worker lives on and serves the next job
    assert worker.poll() is None
    good = submit(env, tmp_path / "good", ["--batch-size", "1", "--points-per-side", "4"])
    wait_job_done(env, good, 1, tmp_path, timeout_s=60)


class PoolKiller(threading.Thread):
    """The OOM killer of a poison task: each time a task counts a new delivery in Redis (the documented
    ``slip:deliveries:<task id>:<retry>`` counter, incremented as the task starts, before the model runs),
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
        while not self._stop_event.is_set() and len(self.kills) < self.times:
            counts = [int(self.redis.get(k) or 0) for k in self.redis.scan_iter("slip:deliveries:*")]
            if counts and max(counts) > len(self.kills):
                for pid in pool_children(self.worker_pid):
                    os.kill(pid, signal.SIGKILL)
                self.kills.append(max(counts))
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


def final_task_ids(env: dict[str, str], job: str) -> list[str]:
    from worker.ledger import task_records

    return [r.task_id for r in task_records(client_for(env).store, job)]
