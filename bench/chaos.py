"""Chaos benchmark: a bulk job that must finish exactly once while its workers, its Redis and its producer die.

    python bench/chaos.py --images 1000 --workers 2 --kills 10 [--kill-every 10 40] [--redis-down 5 30]
                          [--kill-producer at-id|registered|fed] [--baseline] [--out bench/results/chaos-1000.json]

Everything is real and runs with the queue's **default settings** (``SLIP_DEAD_AFTER`` 15 s, ``SLIP_TICK``
3 s, ``SLIP_HEARTBEAT`` 2 s, visibility timeout 3600 s, batch size 4, 32 chunks in flight):

* a private ``redis-server`` on a free port with an append-only file fsynced on every write
  (``appendfsync always``), and a directory store, both in a temporary folder;
* N tiny synthetic PNGs (distinct), segmented by the ``tiny-random`` models with a SAM grid that costs
  about 0.2-0.5 s per image on one core (:data:`SEGMENT_ARGS`);
* W workers, the production command (``celery -A worker worker -Q gpu,cpu --concurrency 1``), under a
  supervisor loop that restarts a worker whose main process died, 1 s later (as systemd or Kubernetes
  would);
* the producer, ``slip submit segment`` as a subprocess, SIGKILLed the moment it prints the job id
  (``--kill-producer at-id``, the issue's scenario), or once Redis has the job (``registered``), or once its
  first window of chunks is sent and its feed lease released (``fed``);
* K SIGKILLs, one every 10-40 s at random, alternately of a whole worker (``killpg``: main process and
  pool, as when a machine dies) and of a worker's pool process alone (as the OOM killer does; ``--kinds``
  picks one kind only); a kill
  waits (a few seconds at most) for a victim that holds a chunk of the job in
  ``slip:job:<id>:running``, so nearly all land mid-task;
* one SIGKILL of Redis halfway through the kills, restarted from its AOF on the same port 5-30 s later.

Nobody retries anything by hand: the bench has no code path that calls ``slip retry``. When the job's
status says it is finished, the bench checks the store (:func:`verify`): every image has exactly one
result (``results/<image sha>/<digest>/segments.json``, one digest per image), each parseable with every
mask decodable; no torn result (a result folder without a readable ``segments.json``); how many
temporary files a killed writer left (``.tmp/``: hidden, never read, swept at a later worker start once
older than ``SLIP_TASK_TIME_LIMIT``); the COCO export loads in ``pycocotools``. The wall time runs from the
job id (the job exists) to the first status poll that finds it finished. With ``--baseline`` it also runs
the same job undisturbed and reports the ratio of the wall times (target: at most 1.5).

Prints one summary line and writes the figures as JSON (``bench/results/chaos-<N>.json``). The process
helpers here (:class:`RedisServer`, :class:`Worker`, :class:`Supervisor`, :func:`submit`, :func:`verify`)
are also used by ``tests/queue/test_chaos_short.py``, ``test_unattended.py`` and ``test_status_cost.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script this file's folder is sys.path[0], and bench/queue.py would shadow the standard `queue`
# module that redis and kombu import: drop the folder, put the repository root in its place
_HERE, ROOT = Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE and p != str(ROOT)]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import select  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Callable, Sequence  # noqa: E402

import numpy as np  # noqa: E402
import redis  # noqa: E402
from PIL import Image  # noqa: E402

PROMPT = "a red box"
# tiny-random SAM: a 12 x 12 point grid with every proposal kept and no filter (the default containment filter
# drops the one or two segments it finds: no mask left to check) costs ~0.2-0.5 s per image on one core
SEGMENT_ARGS = ("--points-per-side", "12", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
                "--filters", "none")
WORKER_READY_S = 180.0  # a loaded 2-core machine may take this long to start a worker
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
TARGET_RATIO = 1.5  # the target: wall time under chaos at most 1.5 x the undisturbed run


# ---------------------------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A private ``redis-server`` (its own port and folder, AOF fsynced on every write) that can be
    SIGKILLed and started again on the same port from the same AOF."""

    def __init__(self, folder: Path, *, port: int | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        self.restarts = 0

    def start(self, timeout_s: float = 30.0) -> "RedisServer":
        with open(self.folder / "redis.log", "ab") as log:
            self.process = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                 "yes", "--appendfsync", "always", "--dir", str(self.folder)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    if client.ping():
                        return self
                except (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError):
                    if time.monotonic() > deadline or self.process.poll() is not None:
                        raise RuntimeError(f"redis-server on port {self.port} did not start "
                                           f"(log: {self.folder / 'redis.log'})") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown save; only what the AOF holds survives."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self) -> None:
        self.kill()
        self.start()
        self.restarts += 1

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, **options) -> redis.Redis:
        return redis.Redis(port=self.port, **options)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


def worker_env(broker_url: str, store: str | Path, **overrides: str) -> dict[str, str]:
    """Environment of workers and producers: tiny-random models on CPU, one torch thread per worker, the
    queue's default timing settings (every other ``SLIP_*`` variable of this process dropped)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIP_")}
    env.update(
        SLIP_BROKER_URL=broker_url, SLIP_STORE=str(store), SLIP_SAM="tiny-random", SLIP_CLIP="tiny-random",
        SLIP_DEVICE="cpu", SLIP_THREADS="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    env.update(overrides)
    return env


def node_name(name: str) -> str:
    """The Celery node name of a worker started as ``-n <name>@%h``."""
    return f"{name}@{socket.gethostname()}"


def children_of(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (a prefork worker's pool processes)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


class Worker:
    """One ``celery -A worker worker`` process (prefork, concurrency 1) in its own session, restartable."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path, *, queues: str = "gpu,cpu") -> None:
        self.name = name
        self.node = node_name(name)
        self.env = env
        self.log_path = Path(log_dir) / f"{name}.log"
        self.queues = queues
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0  # epoch seconds of the current process's start
        self.pool_killed_at = 0.0  # epoch seconds of the last pool kill
        self.starts = 0
        self.lock = threading.Lock()

    def start(self) -> "Worker":
        command = [sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q", self.queues, "-n",
                   f"{self.name}@%h", "-P", "prefork", "--concurrency", "1", "--loglevel", "INFO",
                   "--without-mingle", "--without-gossip"]
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== bench: start {self.starts + 1} at {time.time():.3f} ===\n".encode())
            log.flush()
            self.process = subprocess.Popen(command, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        self.started_at = time.time()
        self.starts += 1
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def pool_pids(self) -> list[int]:
        return children_of(self.pid) if self.alive else []

    def kill_main(self) -> None:
        """SIGKILL the whole process group: main process and pool, as when the machine dies."""
        if self.alive:
            os.killpg(self.pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait()

    def kill_pool(self) -> list[int]:
        """SIGKILL the pool processes only (the main process forks new ones); the pids killed."""
        pids = self.pool_pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.pool_killed_at = time.time()
        return pids

    def stop(self, timeout_s: float = 20.0) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL of the group if it lingers."""
        if self.alive:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.process.wait()

    def log_text(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""


class Supervisor:
    """A process manager's restart loop: a worker whose main process is gone is started again after
    ``delay_s`` (a background thread; :meth:`stop` ends it)."""

    def __init__(self, workers: Sequence[Worker], *, delay_s: float = 1.0, poll_s: float = 0.25) -> None:
        self.workers = list(workers)
        self.delay_s = delay_s
        self.poll_s = poll_s
        self.restarts = 0
        self._dead_since: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)

    def start(self) -> "Supervisor":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            for worker in self.workers:
                with worker.lock:
                    if worker.alive or worker.process is None:
                        self._dead_since.pop(worker.name, None)
                        continue
                    since = self._dead_since.setdefault(worker.name, time.monotonic())
                    if time.monotonic() - since >= self.delay_s:
                        worker.start()
                        self.restarts += 1
                        self._dead_since.pop(worker.name, None)


def client_for(env: dict[str, str]):
    """A :class:`producer.client.QueueClient` for ``env`` (built in this process)."""
    from producer.client import QueueClient
    from worker.settings import Settings

    return QueueClient(Settings.from_env(env))


def wait_ready(client, workers: Sequence[Worker], timeout_s: float = WORKER_READY_S) -> None:
    """Until every worker's pool process answers a health check with its models loaded."""
    from celery.exceptions import TimeoutError as CeleryTimeout

    deadline = time.monotonic() + timeout_s
    for worker in workers:
        while True:
            if not worker.alive:
                raise RuntimeError(f"worker {worker.name} exited before it was ready:\n{worker.log_text()}")
            try:
                report = client.health(worker.node, timeout_s=5.0)
                if report.get("models_loaded"):
                    break
            except CeleryTimeout:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {worker.name} not ready after {timeout_s} s:\n{worker.log_text()}")


def stop_all(workers: Sequence[Worker]) -> None:
    """Stop every worker (warm shutdowns in parallel, then whatever lingers is SIGKILLed)."""
    for worker in workers:
        if worker.alive:
            worker.process.send_signal(signal.SIGTERM)
    for worker in workers:
        worker.stop(timeout_s=20.0)


# ---------------------------------------------------------------------------------------------- the job


def make_images(folder: Path, count: int, *, seed: int = 0) -> list[Path]:
    """``count`` distinct small RGB PNGs (40-64 px a side): a red box and a blue disc on noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        h, w = int(rng.integers(40, 64)), int(rng.integers(40, 64))
        image = (rng.random((h, w, 3)) * 60).astype(np.uint8)
        y, x = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        image[y : y + h // 3, x : x + w // 3] = (220, 30, 30)
        yy, xx = np.mgrid[:h, :w]
        image[(yy - 2 * h // 3) ** 2 + (xx - 2 * w // 3) ** 2 < (min(h, w) // 5) ** 2] = (30, 30, 220)
        path = folder / f"img_{i:05d}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


@dataclass
class Submitted:
    """What the producer subprocess did."""

    job_id: str
    seconds: float  # from its start to the job id on its stdout
    killed: bool  # SIGKILLed right after it printed the id
    returncode: int | None  # exit code when not killed
    stderr: str


def submit(env: dict[str, str], folder: Path, args: Sequence[str], *, kill: bool, timeout_s: float = 600.0,
           before_kill: Callable[[str], None] | None = None, log: Path | None = None) -> Submitted:
    """``slip submit segment FOLDER --prompt PROMPT ARGS`` as a real process (``python -m producer``); its
    first stdout line is the job id. ``kill``: SIGKILL it the moment that line is read (``before_kill(job)``
    runs first, e.g. to look at Redis), else wait for it to exit."""
    command = [sys.executable, "-m", "producer", "submit", "segment", str(folder), "--prompt", PROMPT, *args]
    err_path = log or Path(tempfile.mkstemp(prefix="slip-submit-", suffix=".err")[1])
    start = time.monotonic()
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, start_new_session=True)
    try:
        line = _read_line(proc, timeout_s)
        seconds = time.monotonic() - start
        job = line.strip()
        if not JOB_ID.fullmatch(job):
            proc.wait(timeout=60)
            raise RuntimeError(f"slip submit printed {line!r}, not a job id (exit {proc.returncode}): "
                               f"{Path(err_path).read_text(errors='replace')[-2000:]}")
        if kill:
            if before_kill:
                before_kill(job)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return Submitted(job, seconds, True, None, Path(err_path).read_text(errors="replace"))
        proc.wait(timeout=timeout_s)
        return Submitted(job, time.monotonic() - start, False, proc.returncode, Path(err_path).read_text(errors="replace"))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


def _read_line(proc: subprocess.Popen, timeout_s: float) -> str:
    """The first line ``proc`` writes on stdout (unbuffered read, bounded by ``timeout_s``)."""
    fd, data, deadline = proc.stdout.fileno(), b"", time.monotonic() + timeout_s
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError(f"slip submit printed no job id in {timeout_s} s")
        ready, _, _ = select.select([fd], [], [], min(remaining, 1.0))
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                proc.wait(timeout=30)
                raise RuntimeError(f"slip submit exited ({proc.returncode}) without printing a job id")
            data += chunk
    return data.split(b"\n", 1)[0].decode()


def running(r: redis.Redis, job: str) -> dict[int, dict]:
    """``slip:job:<id>:running``: chunk -> {"task", "worker", "node", "at"}."""
    return {int(k): json.loads(v) for k, v in r.hgetall(f"slip:job:{job}:running").items()}


def holder_of(r: redis.Redis, job: str, workers: Sequence[Worker], *, pool: bool,
              avoid: frozenset[int] = frozenset()) -> tuple[Worker, int] | None:
    """A live worker of ``workers`` that holds a chunk of ``job`` now, and the chunk: its running mark was
    written by the worker's current process (after its start and, for a pool kill, after the last one).
    Chunks in ``avoid`` are taken only when no other chunk is running."""
    found = []
    for chunk, mark in running(r, job).items():
        for worker in workers:
            since = max(worker.started_at, worker.pool_killed_at if pool else 0.0)
            if worker.alive and mark.get("node") == worker.node and mark.get("at", 0) > since:
                found.append((worker, chunk))
    fresh = [(w, c) for w, c in found if c not in avoid]
    return random.choice(fresh or found) if found else None


@dataclass
class Poll:
    """The job's status over time, as :meth:`producer.client.QueueClient.status` reads it."""

    samples: list[tuple[float, dict]] = field(default_factory=list)  # (seconds since start, summary)
    troubles: int = 0  # polls that raised (Redis or the store away)
    ever_lost: int = 0  # the most images a poll called "lost"


def wait_finished(client, job: str, *, timeout_s: float, poll_s: float = 1.0, start: float | None = None,
                  poll: Poll | None = None):
    """Poll the status until the job is finished (or ``timeout_s``); (status, Poll). Rides out outages."""
    from slip.errors import SlipError

    start = time.monotonic() if start is None else start
    poll = poll or Poll()
    status = None
    while True:
        try:
            status = client.status(job)
            summary = status.summary()
            poll.samples.append((round(time.monotonic() - start, 2), summary))
            poll.ever_lost = max(poll.ever_lost, summary["lost"])
            if status.finished:
                return status, poll
        except (SlipError, redis.exceptions.RedisError, OSError):
            poll.troubles += 1
        if time.monotonic() - start > timeout_s:
            return status, poll
        time.sleep(poll_s)


# ---------------------------------------------------------------------------------------------- checks


def verify(client, job: str) -> dict:
    """Check the store after a job: every image exactly one complete result (one ``segments.json`` under
    ``results/<image sha>/``, parseable, every mask decodable to the image's size), which images have none,
    torn result folders, temporaries left by killed writers. Returns the counts and up to 10 examples."""
    from pycocotools import mask as mask_utils

    from worker.ledger import chunk_records, iter_items, load_manifest

    store = client.store
    manifest = load_manifest(store, job)
    outcomes = {o.index: o for record in chunk_records(store, job) for o in record.items}
    results: dict[str, list[str]] = {}
    other_files: dict[str, list[str]] = {}
    for key in store.list("results"):
        _, sha, digest_, name = key.split("/", 3)
        folder = f"results/{sha}/{digest_}"
        (results if name == "segments.json" else other_files).setdefault(folder, []).append(name)
    by_sha: dict[str, list[str]] = {}
    for folder in results:
        by_sha.setdefault(folder.split("/")[1], []).append(folder)
    counts = {"images": manifest.total, "exactly_once": 0, "none": 0, "several": 0, "torn": 0, "not_done": 0,
              "segments": 0}
    examples: list[str] = []
    for item in iter_items(store, manifest):
        folders = by_sha.get(item.image_sha, [])
        outcome = outcomes.get(item.index)
        if outcome is None or outcome.state != "done":
            counts["not_done"] += 1
            examples.append(f"{item.name}: {'no record' if outcome is None else outcome.reason}")
        if not folders:
            counts["none"] += 1
            continue
        if len(folders) > 1:
            counts["several"] += 1
            examples.append(f"{item.name}: {len(folders)} results {folders}")
            continue
        try:
            doc = store.get_json(f"{folders[0]}/segments.json")
            size = [doc["image_size"]["height"], doc["image_size"]["width"]]
            for segment in doc["segments"]:
                rle = dict(segment["segmentation"])
                rle["counts"] = rle["counts"].encode()
                if list(mask_utils.decode(rle).shape) != size:
                    raise ValueError(f"mask of size {mask_utils.decode(rle).shape} in an image of size {size}")
            counts["segments"] += len(doc["segments"])
            if outcome is not None and outcome.state == "done" and outcome.result_key != folders[0]:
                raise ValueError(f"its record names {outcome.result_key}, the store holds {folders[0]}")
            counts["exactly_once"] += 1
        except Exception as e:  # a torn or foreign result: counted, shown
            counts["torn"] += 1
            examples.append(f"{item.name}: {type(e).__name__}: {e}")
    counts["folders_without_result"] = len(set(other_files) - set(results))
    counts["temporaries"] = len(temporaries(store))
    counts["examples"] = examples[:10]
    return counts


def temporaries(store) -> list[str]:
    """Temporary files under the store root (``.tmp/``, or any ``.tmp-`` name); none exist on object stores."""
    if not store.local:
        return [k for k in store.list() if ".tmp" in k]
    root = Path(store.root)
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and (".tmp" in p.name or
                                                                                   ".tmp" in p.parts)]


def coco_check(client, job: str, out: Path) -> dict:
    """The job's COCO export (``producer.exports.write_export``) loaded by ``pycocotools.coco.COCO``."""
    try:
        from producer.exports import write_export
    except ImportError as e:
        return {"skipped": f"producer.exports is not there yet ({e}): COCO export not checked"}
    import contextlib
    import io

    from pycocotools.coco import COCO

    from worker.ledger import load_manifest

    manifest = load_manifest(client.store, job)
    summary = write_export(client.export_items(job), format="coco", out=out, prompts=manifest.spec.prompts,
                           job_id=job)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(out))
    for ann in coco.loadAnns(coco.getAnnIds()):
        coco.annToMask(ann)  # every annotation's mask decodes
    return {"images": len(coco.getImgIds()), "annotations": len(coco.getAnnIds()),
            "categories": len(coco.getCatIds()), "summary": str(summary)}


def log_counts(workers: Sequence[Worker]) -> dict:
    """What the workers' logs say the feeder did: re-sends by reason, chunks given up, poison chunks."""
    text = "".join(w.log_path.read_text(errors="replace") for w in workers if w.log_path.exists())
    reasons = re.findall(r"sending again \(\d+/\d+\): (.*)", text)
    by_reason: dict[str, int] = {}
    for reason in reasons:
        key = "worker stopped beating" if "stopped beating" in reason else reason.strip()
        by_reason[key] = by_reason.get(key, 0) + 1
    return {"resends": len(reasons), "resends_by_reason": by_reason, "gave_up": len(re.findall(r"gave up after", text)),
            "poison": len(re.findall(r"poison: started", text)),
            "internal_errors": len(re.findall(r"internal error", text)),
            # Celery killed a new pool process still loading the models (worker_proc_alive_timeout)
            "pool_starts_killed": len(re.findall(r"Timed out waiting for UP message", text))}


# ---------------------------------------------------------------------------------------------- chaos


@dataclass
class Plan:
    """The faults of one run."""

    kills: int = 10  # worker SIGKILLs
    kill_every: tuple[float, float] = (10.0, 40.0)  # seconds between kills, uniform
    redis_down: tuple[float, float] | None = (5.0, 30.0)  # Redis SIGKILL + AOF restart after this long; None: no
    redis_after_kill: int | None = None  # the Redis restart follows this kill (default: half of them)
    mid_task_wait_s: float = 8.0  # how long a kill waits for a victim that holds a chunk
    kinds: tuple[str, ...] = ("main", "pool")  # what the kills take, in turn: "main" (the machine) or "pool"
    seed: int = 0


class Chaos:
    """The fault thread: kills workers (alternately whole and pool-only) and restarts Redis once."""

    def __init__(self, plan: Plan, *, job: str, workers: Sequence[Worker], server: RedisServer) -> None:
        self.plan = plan
        self.job = job
        self.workers = list(workers)
        self.server = server
        self.rng = random.Random(plan.seed)
        self.kills: list[dict] = []
        self.redis: list[dict] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos", daemon=True)
        self._start = time.monotonic()

    def start(self) -> "Chaos":
        self._start = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def _run(self) -> None:
        redis_after = self.plan.redis_after_kill if self.plan.redis_after_kill is not None else self.plan.kills // 2
        kinds = list(self.plan.kinds)
        self.rng.shuffle(kinds)
        r = self.server.client(socket_timeout=5, socket_connect_timeout=2)
        try:
            for k in range(self.plan.kills):
                if self._stop.wait(self.rng.uniform(*self.plan.kill_every)):
                    return
                try:
                    self._kill(r, kinds[k % len(kinds)])
                except Exception as e:  # noqa: BLE001 (a fault thread never dies of a fault)
                    self.errors.append(f"kill {k}: {type(e).__name__}: {e}")
                if self.plan.redis_down is not None and k + 1 == max(1, redis_after) and not self._stop.is_set():
                    self._restart_redis()
        finally:
            r.close()

    def _kill(self, r: redis.Redis, kind: str) -> None:
        # a victim that holds a chunk now, preferably one not hit before: the same chunk killed on every
        # delivery is what the poison guard (SLIP_MAX_DELIVERIES) is for, not what random faults do
        deadline = time.monotonic() + self.plan.mid_task_wait_s
        hit = frozenset(k["chunk"] for k in self.kills if k["chunk"] is not None)
        target = None
        while time.monotonic() < deadline and not self._stop.is_set():
            try:
                target = holder_of(r, self.job, self.workers, pool=kind == "pool", avoid=hit)
            except redis.exceptions.RedisError:
                target = None
            if target is not None and (target[1] not in hit or time.monotonic() > deadline - 1.0):
                break
            time.sleep(0.1)
        if self._stop.is_set():
            return
        if target is None:  # nobody holds a chunk right now: kill a live worker anyway
            live = [w for w in self.workers if w.alive]
            if not live:
                return
            worker, chunk = self.rng.choice(live), None
        else:
            worker, chunk = target
        with worker.lock:
            if not worker.alive:
                return
            pids = [worker.pid]
            if kind == "main":
                pids += worker.pool_pids()
                worker.kill_main()
            else:
                pids = worker.kill_pool()
        self.kills.append({"t": round(time.monotonic() - self._start, 2), "kind": kind, "worker": worker.name,
                           "pids": pids, "mid_task": chunk is not None, "chunk": chunk})

    def _restart_redis(self) -> None:
        down = self.rng.uniform(*self.plan.redis_down)
        t = time.monotonic() - self._start
        self.server.kill()
        self._stop.wait(down)  # the outage lasts even if the job is asked to stop
        self.server.start()
        self.server.restarts += 1
        self.redis.append({"t": round(t, 2), "down_s": round(down, 2)})


def registered(r: redis.Redis, job: str, *, fed: bool = False, timeout_s: float = 30.0) -> float:
    """Seconds until the cluster has ``job`` (``slip:job:<id>`` exists) and, with ``fed``, until its first
    chunks are sent and nobody holds its feed lease; RuntimeError after ``timeout_s``."""
    start = time.monotonic()

    def ready() -> bool:
        if not fed:
            return bool(r.exists(f"slip:job:{job}"))
        return int(r.hget(f"slip:job:{job}", "next") or 0) > 0 and not r.exists(f"slip:lock:feed:{job}")

    while not ready():
        if time.monotonic() - start > timeout_s:
            raise RuntimeError(f"job {job} was not {'fed' if fed else 'registered'} in Redis within {timeout_s} s")
        time.sleep(0.002)
    return time.monotonic() - start


def run(images: Sequence[Path], *, workdir: Path, workers: int = 2, plan: Plan | None = None,
        submit_args: Sequence[str] = (), timeout_s: float = 3600.0, coco: bool = True,
        settle_s: float = 5.0, kill_producer: str = "at-id", progress: Callable[[str], None] | None = None) -> dict:
    """One run: a private Redis, ``workers`` supervised workers, the producer SIGKILLed the moment it prints
    the job id (``kill_producer="at-id"``, the issue's scenario), once the job is registered in Redis
    (``"registered"``) or once its first window is sent (``"fed"``), the faults of ``plan`` (None:
    undisturbed), then :func:`verify`. The figures as a dict."""
    say = progress or (lambda text: None)
    workdir.mkdir(parents=True, exist_ok=True)
    server = RedisServer(workdir / "redis").start()
    store = workdir / "store"
    env = worker_env(server.url(), store)
    pool = [Worker(f"chaos{i}", env, workdir) for i in range(workers)]
    supervisor = Supervisor(pool)
    chaos = None
    try:
        for worker in pool:
            worker.start()
        client = client_for(env)
        wait_ready(client, pool)
        supervisor.start()
        say(f"{workers} workers ready; submitting {len(images)} images")
        import slip.filters  # noqa: F401  (reading a manifest with a filter chain imports it, and torch: seconds)

        load_before = os.getloadavg()
        start = time.monotonic()
        folder = images[0].parent
        r = server.client()
        waited = []
        hook = None if kill_producer == "at-id" else (
            lambda job: waited.append(registered(r, job, fed=kill_producer == "fed")))
        submitted = submit(env, folder, [*SEGMENT_ARGS, *submit_args], kill=True, before_kill=hook,
                           log=workdir / "submit.err")
        r.close()
        say(f"job {submitted.job_id} (producer SIGKILLed {submitted.seconds:.1f} s after its start)")
        job_start = time.monotonic()  # the job exists from here: the wall time is the job's, not the upload's
        if plan is not None:
            chaos = Chaos(plan, job=submitted.job_id, workers=pool, server=server).start()
        status, poll = wait_finished(client, submitted.job_id, timeout_s=timeout_s, poll_s=2.0, start=job_start)
        wall = time.monotonic() - job_start
        time_to_finish = time.monotonic() - start
        if chaos is not None:
            chaos.stop()
        load_after = os.getloadavg()
        first = status.summary() if status is not None else None
        say(f"finished in {wall:.1f} s: {first}")
        # a moment for what is still queued (re-sends) to land, then the final word
        time.sleep(settle_s)
        final, _ = wait_finished(client, submitted.job_id, timeout_s=60, poll_s=1.0)
        checks = verify(client, submitted.job_id)
        coco_report = coco_check(client, submitted.job_id, workdir / "export.coco.json") if coco else {"skipped": "not asked"}
    finally:
        if chaos is not None:
            chaos.stop()
        supervisor.stop()
        stop_all(pool)
        server.kill()
    kills = chaos.kills if chaos else []
    lost = checks["images"] - checks["exactly_once"] - checks["several"] - checks["torn"]
    return {
        "images": len(images), "workers": workers, "job_id": submitted.job_id, "submit_s": round(submitted.seconds, 2),
        "producer_killed": kill_producer, "registered_after_id_s": round(waited[0], 4) if waited else None,
        "wall_s": round(wall, 2), "submit_to_finish_s": round(time_to_finish, 2),
        "finished": bool(status and status.finished),
        "status_at_finish": first, "status_final": final.summary() if final is not None else None,
        "kills": {"total": len(kills), "main": sum(k["kind"] == "main" for k in kills),
                  "pool": sum(k["kind"] == "pool" for k in kills), "mid_task": sum(k["mid_task"] for k in kills)},
        "kill_log": kills, "redis_restarts": len(chaos.redis) if chaos else 0,
        "redis_log": chaos.redis if chaos else [], "chaos_errors": chaos.errors if chaos else [],
        "worker_restarts": supervisor.restarts,
        "exactly_once": checks["exactly_once"], "lost": lost, "several_results": checks["several"],
        "torn": checks["torn"], "not_done": checks["not_done"], "temporaries_left": checks["temporaries"],
        "segments": checks["segments"], "examples": checks["examples"], "manual_retries": 0,
        "status_polls_failed": poll.troubles, "status_ever_lost": poll.ever_lost,
        "feeder": log_counts(pool), "coco": coco_report,
        "loadavg": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in load_after]},
        "progress": _thin(poll.samples),
    }


def _thin(samples: list[tuple[float, dict]], every_s: float = 15.0) -> list[tuple[float, int]]:
    """(seconds, done) about every ``every_s`` seconds, for the record."""
    out, last = [], -every_s
    for t, summary in samples:
        if t - last >= every_s:
            out.append((t, summary["done"]))
            last = t
    if samples:
        out.append((samples[-1][0], samples[-1][1]["done"]))
    return out


def passed(result: dict) -> bool:
    """The issue's targets: every image exactly once, nothing lost or torn, no retry by hand, and (when a
    baseline was run) a wall time at most 1.5 x the undisturbed one."""
    ok = (result["exactly_once"] == result["images"] and result["lost"] == 0 and result["torn"] == 0
          and result["manual_retries"] == 0)
    ratio = result.get("ratio")
    return ok and (ratio is None or ratio <= TARGET_RATIO)


def summary_line(result: dict) -> str:
    k = result["kills"]
    ratio = result.get("ratio")
    return (f"chaos: {result['exactly_once']}/{result['images']} images exactly once, {result['lost']} lost, "
            f"{result['torn']} torn, {result['temporaries_left']} temporaries left, {result['manual_retries']} manual "
            f"retries; {k['total']} kills ({k['main']} main, {k['pool']} pool, {k['mid_task']} mid-task), "
            f"{result['redis_restarts']} Redis restart(s); wall {result['wall_s']:.0f} s"
            + (f" vs {result['baseline_wall_s']:.0f} s undisturbed = {ratio:.2f}x" if ratio is not None else "")
            + f"; {'PASS' if passed(result) else 'FAIL'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--kill-every", type=float, nargs=2, default=(10.0, 40.0), metavar=("MIN_S", "MAX_S"))
    parser.add_argument("--redis-down", type=float, nargs=2, default=(5.0, 30.0), metavar=("MIN_S", "MAX_S"))
    parser.add_argument("--no-redis", action="store_true", help="no Redis restart")
    parser.add_argument("--kinds", default="main,pool",
                        help="what the kills take, in turn: main (a whole worker) and/or pool (its pool process)")
    parser.add_argument("--baseline", action="store_true", help="also run the same job undisturbed (the ratio)")
    parser.add_argument("--baseline-wall", type=float, default=None, help="an undisturbed wall time measured before")
    parser.add_argument("--kill-producer", choices=("at-id", "registered", "fed"), default="at-id",
                        help="SIGKILL the producer the moment it prints the job id (the issue's scenario), once "
                             "Redis has the job, or once its first chunks are sent")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the run's files here (default: temporary)")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/chaos-<N>.json")
    args = parser.parse_args(argv)
    from worker.settings import Settings

    out = args.out or ROOT / "bench" / "results" / f"chaos-{args.images}.json"
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="slip-chaos-"))
    say = lambda text: print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)  # noqa: E731
    images = make_images(workdir / "images", args.images, seed=args.seed)
    plan = Plan(kills=args.kills, kill_every=tuple(args.kill_every), kinds=tuple(args.kinds.split(",")),
                redis_down=None if args.no_redis else tuple(args.redis_down), seed=args.seed)
    # a SIGTERM (timeout, a CI runner) ends the run through its finally blocks: no worker or Redis left behind
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    say(f"chaos run: {args.images} images, {args.workers} workers, {args.kills} kills (workdir {workdir})")
    result = run(images, workdir=workdir / "chaos", workers=args.workers, plan=plan, timeout_s=args.timeout,
                 kill_producer=args.kill_producer, progress=say)
    baseline = args.baseline_wall
    if args.baseline:
        say("baseline run (undisturbed)")
        base = run(images, workdir=workdir / "baseline", workers=args.workers, plan=None, timeout_s=args.timeout,
                   coco=False, kill_producer=args.kill_producer, progress=say)
        baseline = base["wall_s"]
        result["baseline"] = {k: base[k] for k in ("wall_s", "exactly_once", "lost", "torn", "loadavg", "feeder")}
    if baseline:
        result["baseline_wall_s"] = baseline
        result["ratio"] = round(result["wall_s"] / baseline, 3)
    result["command"] = "python bench/chaos.py " + " ".join(sys.argv[1:] if argv is None else argv)
    defaults = Settings()
    result["settings"] = {"segment_args": list(SEGMENT_ARGS), "batch_size": 4, "max_in_flight": 32,
                          "SLIP_DEAD_AFTER": defaults.dead_after_s, "SLIP_TICK": defaults.tick_s,
                          "SLIP_HEARTBEAT": defaults.heartbeat_s, "SLIP_LOST_AFTER": defaults.lost_after_s,
                          "SLIP_VISIBILITY_TIMEOUT": defaults.visibility_timeout_s, "cores": os.cpu_count()}
    result["passed"] = passed(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(summary_line(result))
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
