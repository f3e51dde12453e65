"""Helpers for the queue tests: the real Redis, real ``celery -A worker worker`` subprocesses.

Import them with ``from queue_helpers import ...`` (pytest puts tests/queue on sys.path); the fixtures
built on them are in ``conftest.py`` beside this file::

    env = queue_env(store_dir, db=14)                      # SLIP_* for tiny-random models on CPU
    proc = start_worker(env, ("gpu", "cpu"), "w2", log_path=tmp / "w2.log")
    report = wait_worker_ready(env, "w2", process=proc)    # health report, from the pool process
    stop_worker(proc)                                      # SIGTERM, then SIGKILL after a timeout
    run_cli(["status", job_id], env)                       # the `slip` console command

Redis db 15 belongs to the session worker of this folder (fixture ``worker``); tests that start their
own workers should take another db (docs/CONTRACTS.md lists them) and flush it themselves, or their
tasks would be picked up by the session worker.

The queue's state is read the way producers read it: ``client.status(job)`` (counts), the chunks'
completion records (:func:`outcomes`: each image's ``ItemOutcome`` with its ``result_key``) and the
manifest's items (:func:`items_of`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import redis
from PIL import Image
import redis_dbs

REPO = Path(__file__).resolve().parents[2]
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
SESSION_DB = redis_dbs.SESSION
WORKER_START_S = 150.0
# generator settings that make the tiny-random SAM return segments, fast (16 points per image)
TINY_PARAMS = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "filters": "none"}
TINY_CLI_ARGS = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--filters", "none"]


def redis_url(db: int = SESSION_DB, port: int = REDIS_PORT) -> str:
    return f"redis://{REDIS_HOST}:{port}/{db}"


def queue_env(store: Path, *, db: int = SESSION_DB, port: int = REDIS_PORT, **overrides: str) -> dict[str, str]:
    """Environment for workers and the CLI: tiny-random models on CPU, short limits, ``store``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIP_")}
    env.update(
        SLIP_BROKER_URL=redis_url(db, port),
        SLIP_STORE=str(store),
        SLIP_SAM="tiny-random",
        SLIP_CLIP="tiny-random",
        SLIP_DEVICE="cpu",
        SLIP_TASK_TIME_LIMIT="120",
        SLIP_VISIBILITY_TIMEOUT="150",
        SLIP_DEAD_AFTER="6",  # a reaper beat every second, so tests need not wait long
        SLIP_LOST_AFTER="5",
        SLIP_MAX_ATTEMPTS="2",  # a chunk that failed for now runs once more, then stays failed
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
    )
    env.update(overrides)
    return env


def node_name(name: str) -> str:
    """Celery node name of a worker started as ``-n name@%h``."""
    return f"{name}@{socket.gethostname()}"


def start_worker(
    env: dict[str, str],
    queues: Sequence[str] = ("gpu", "cpu"),
    name: str = "w1",
    *,
    pool: str = "prefork",
    concurrency: int = 1,
    log_path: Path | None = None,
    extra_args: Sequence[str] = (),
) -> subprocess.Popen:
    """``celery -A worker worker -Q <queues> -n <name>@%h`` as written in the README, in its own session."""
    command = [
        sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q", ",".join(queues), "-n", f"{name}@%h",
        "-P", pool, "--concurrency", str(concurrency), "--loglevel", "INFO", "--without-mingle", "--without-gossip",
        *extra_args,
    ]
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        return subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        if log_path:
            log.close()


def wait_worker_ready(env: dict[str, str], name: str, *, process: subprocess.Popen | None = None,
                      timeout_s: float = WORKER_START_S) -> dict:
    """The worker's health report (answered by its pool process), via its direct queue."""
    from celery.exceptions import TimeoutError as CeleryTimeout

    client = client_for(env)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"worker {name} exited with code {process.returncode} before it was ready")
        try:
            return client.health(node_name(name), timeout_s=5.0)
        except CeleryTimeout:
            continue
    raise RuntimeError(f"worker {name} did not answer a health check within {timeout_s} s")


def stop_worker(process: subprocess.Popen, *, timeout_s: float = 30.0, sig: int = signal.SIGTERM) -> int:
    """Send ``sig`` (warm shutdown by default), SIGKILL the group if it lingers; the exit code."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode


def run_cli(args: Sequence[str], env: dict[str, str], *, timeout: float = 300.0) -> subprocess.CompletedProcess:
    """The ``slip`` console command (``python -m producer`` runs ``producer.cli:main``)."""
    return subprocess.run([sys.executable, "-m", "producer", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def make_images(folder: Path, count: int, *, seed: int = 0, prefix: str = "img") -> list[Path]:
    """``count`` small PNGs of varied sizes, each with a red box and a blue disc on noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        h, w = int(rng.integers(40, 72)), int(rng.integers(40, 72))
        image = (rng.random((h, w, 3)) * 60).astype(np.uint8)
        y, x = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        image[y : y + h // 3, x : x + w // 3] = (220, 30, 30)
        yy, xx = np.mgrid[:h, :w]
        image[(yy - 2 * h // 3) ** 2 + (xx - 2 * w // 3) ** 2 < (min(h, w) // 5) ** 2] = (30, 30, 220)
        path = folder / f"{prefix}_{i:03d}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def flush(db: int, port: int = REDIS_PORT) -> None:
    client = redis.Redis(host=REDIS_HOST, port=port, db=db)
    try:
        client.flushdb()
    finally:
        client.close()


def job_id_from(stdout: str) -> str:
    """The job id: the first line `slip submit` prints."""
    return stdout.strip().splitlines()[0].strip()


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def client_for(env: dict[str, str]):
    """A :class:`producer.client.QueueClient` for ``env`` (every setting read, as a worker reads them)."""
    from jobs.settings import Settings
    from producer.client import QueueClient

    return QueueClient(Settings.from_env(env))


def items_of(store, job_id: str) -> list:
    """The job's items (``jobs.model.Item``: index, image_key, image_sha, name), in index order."""
    from jobs.ledger import load_manifest
    from jobs.status import iter_items

    return list(iter_items(store, load_manifest(store, job_id)))


def outcomes(store, job_id: str) -> dict:
    """Item index -> its ``ItemOutcome`` from the chunks' completion records (the best record per chunk)."""
    from jobs.status import chunk_records

    return {o.index: o for record in chunk_records(store, job_id) for o in record.items}


def records(store, job_id: str) -> list:
    """The job's completion records (``ChunkRecord``), the best one per chunk, in chunk order."""
    from jobs.status import chunk_records

    return list(chunk_records(store, job_id))


def all_done(total: int) -> dict[str, int]:
    """The counts of a job whose ``total`` images are all done."""
    return {"done": total, "failed": 0, "running": 0, "queued": 0, "waiting": 0, "lost": 0}


def invoke_cli(args: Sequence[str], env: dict[str, str]):
    """The same ``slip`` typer app, in this process (fast; no fresh interpreter); a click Result
    with ``exit_code``, ``stdout``, ``stderr``. Use :func:`run_cli` where a real process matters."""
    from typer.testing import CliRunner

    from producer.cli import build_app

    slip_env = {k: v for k, v in env.items() if k.startswith("SLIP_")}
    cleared = {k: None for k in os.environ if k.startswith("SLIP_") and k not in slip_env}
    return CliRunner().invoke(build_app(), list(args), env={**cleared, **slip_env}, catch_exceptions=True)


def require_redis() -> None:
    """Fail the test (not error out) with the set-up command when Redis does not answer."""
    import pytest

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as e:
        pytest.fail(f"Redis does not answer on {REDIS_HOST}:{REDIS_PORT}: run `bash scripts/setup.sh` ({e})")
    finally:
        client.close()


@contextmanager
def module_worker(tmp_path_factory, *, db: int, name: str) -> Iterator[dict]:
    """A real worker (queues gpu + cpu, tiny-random models) on Redis ``db`` with its own store and cache,
    for one test module: ``{"env", "store", "log"}``; ``db`` is flushed before and after."""
    import pytest

    require_redis()
    flush(db)
    store = tmp_path_factory.mktemp(f"{name}-store")
    env = queue_env(store, db=db, SLIP_CACHE=str(tmp_path_factory.mktemp(f"{name}-cache")))
    log = tmp_path_factory.mktemp(f"{name}-logs") / f"{name}.log"
    process = start_worker(env, ("gpu", "cpu"), name, log_path=log)
    try:
        wait_worker_ready(env, name, process=process)
    except RuntimeError as e:
        stop_worker(process, timeout_s=5)
        pytest.fail(f"{e}\n--- worker log ---\n{log.read_text(errors='replace')[-4000:]}")
    try:
        yield {"env": env, "store": store, "log": log}
    finally:
        stop_worker(process)
        flush(db)


def bench_module(name: str):
    """``bench/<name>.py``, imported by path (bench/ is a folder of scripts, not an installed package)."""
    import importlib.util

    module_name = f"slip_bench_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, REPO / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]
