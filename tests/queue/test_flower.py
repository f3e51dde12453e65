"""Flower against the real broker: ``celery -A worker flower`` as a subprocess beside a real worker.

A job goes through the real CLI; Flower's HTTP API (basic auth, as in docker-compose.yml) must then show
the worker and the finished ``slip.segment`` tasks (one per chunk) with their readable names and small
argument summaries (``job=... chunk=... items=... prompts=[...]``: the masks never travel through Redis, so
the arguments and results stay small). Without credentials: 401. The
credentials come from ``FLOWER_BASIC_AUTH`` in the environment, exactly as docker-compose.yml passes them.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from typing import Iterator

import pytest
import requests

from browser import wait_http
from queue_helpers import (
    REPO,
    TINY_CLI_ARGS,
    flush,
    job_id_from,
    make_images,
    node_name,
    queue_env,
    run_cli,
    start_worker,
    stop_worker,
    wait_worker_ready,
)
import redis_dbs

pytestmark = pytest.mark.integration
FLOWER_DB = redis_dbs.FLOWER
AUTH = ("ops", "s3cret-flower")
IMAGES = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stack(redis_alive, tmp_path_factory) -> Iterator[dict]:
    """A worker, Flower on a free port (basic auth), and one finished job, all on Redis db 11."""
    tmp = tmp_path_factory.mktemp("flower")
    flush(FLOWER_DB)
    env = queue_env(tmp / "store", db=FLOWER_DB)
    worker = start_worker(env, ("gpu", "cpu"), "flowerw", log_path=tmp / "worker.log")
    port = free_port()
    flower_log = open(tmp / "flower.log", "wb")
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker", "flower", f"--port={port}", "--address=127.0.0.1"],
        env={**env, "FLOWER_BASIC_AUTH": f"{AUTH[0]}:{AUTH[1]}"}, cwd=REPO, stdout=flower_log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/api/workers", flower, tmp / "flower.log", what="Flower")
        wait_worker_ready(env, "flowerw", process=worker)
        folder = tmp / "images"
        make_images(folder, IMAGES)
        done = run_cli(["submit", "segment", str(folder), "--prompt", "a red box", "--wait", "--batch-size", "1",
                        *TINY_CLI_ARGS], env, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        yield {"base": base, "job": job_id_from(done.stdout), "env": env, "logs": tmp}
    finally:
        stop_worker(flower, timeout_s=10)
        stop_worker(worker)
        flower_log.close()
        flush(FLOWER_DB)


def api(stack: dict, path: str, **params) -> object:
    response = requests.get(f"{stack['base']}{path}", auth=AUTH, params=params, timeout=30)
    assert response.status_code == 200, f"{path}: {response.status_code} {response.text[:300]}"
    return response.json()


def finished_segment_tasks(stack: dict, timeout_s: float = 30.0) -> dict[str, dict]:
    """Flower's view of the job's slip.segment tasks, once every one has its final state."""
    deadline = time.monotonic() + timeout_s
    while True:
        tasks = api(stack, "/api/tasks", taskname="slip.segment")
        ours = {tid: t for tid, t in tasks.items() if stack["job"] in (t.get("kwargs") or "")}
        if len(ours) == IMAGES and all(t["state"] == "SUCCESS" for t in ours.values()):
            return ours
        if time.monotonic() > deadline:
            log = (stack["logs"] / "flower.log").read_text(errors="replace")[-3000:]
            pytest.fail(f"Flower shows {len(ours)} of {IMAGES} finished tasks: {ours}\n--- flower log ---\n{log}")
        time.sleep(0.5)


def test_flower_lists_the_worker(stack):
    node = node_name("flowerw")
    deadline = time.monotonic() + 30
    while True:
        workers = api(stack, "/api/workers", refresh="true")
        if node in workers or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert node in workers, f"worker {node} not in Flower's list {sorted(workers)}"
    info = workers[node]
    assert "slip.segment" in info.get("registered", []), info.get("registered")
    queues = {q["name"] for q in info.get("active_queues", [])}
    assert {"gpu", "cpu"} <= queues, queues


def test_flower_shows_finished_tasks_with_readable_names_and_small_arguments(stack):
    tasks = finished_segment_tasks(stack)
    node = node_name("flowerw")
    for task_id, task in tasks.items():
        assert task["name"] == "slip.segment"
        assert task["worker"] == node
        assert re.fullmatch(rf"{{'job': '{stack['job']}', 'chunk': \d+, 'attempt': 0}}", task["kwargs"]), task["kwargs"]
        chunk = re.search(r"'chunk': (\d+)", task["kwargs"]).group(1)
        assert task_id == f"{stack['job']}.{chunk}.0", task_id  # (job, chunk, attempt): readable in Flower
        assert len(task["kwargs"]) < 300 and len(task.get("args") or "") < 300, "arguments must stay small"
        assert task["runtime"] is not None and task["runtime"] > 0
        detail = api(stack, f"/api/task/info/{task_id}")
        assert detail["state"] == "SUCCESS"
        assert len(detail.get("result") or "") < 4000, "a task result is a small JSON record, no masks"
        assert "'done': 1, 'failed': 0, 'letters': 'd'" in (detail.get("result") or ""), detail.get("result")
    assert sorted(int(re.search(r"'chunk': (\d+)", t["kwargs"]).group(1)) for t in tasks.values()) == list(range(IMAGES))


def test_flower_requires_basic_auth(stack):
    for path in ("/api/workers", "/api/tasks", "/"):
        assert requests.get(f"{stack['base']}{path}", timeout=10).status_code == 401, path
        assert requests.get(f"{stack['base']}{path}", auth=(AUTH[0], "wrong"), timeout=10).status_code == 401, path
