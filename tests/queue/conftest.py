"""Fixtures for the queue tests: Redis db 15, a temporary store, one session worker, a client.

Helpers (``start_worker``, ``wait_worker_ready``, ``stop_worker``, ``queue_env``, ``run_cli``, ``invoke_cli``,
``make_images``, ``outcomes``, ``items_of``) live in ``queue_helpers.py`` and are re-exported here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from queue_helpers import (  # noqa: F401  (re-exported for other test modules)
    REDIS_HOST,
    REDIS_PORT,
    SESSION_DB,
    TINY_CLI_ARGS,
    TINY_PARAMS,
    all_done,
    client_for,
    flush,
    items_of,
    job_id_from,
    make_images,
    node_name,
    outcomes,
    queue_env,
    records,
    redis_url,
    require_redis,
    run_cli,
    start_worker,
    stop_worker,
    wait_worker_ready,
)


# --- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_alive() -> None:
    require_redis()


@pytest.fixture(scope="session")
def session_store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slip-store")


@pytest.fixture(scope="session")
def session_env(redis_alive, session_store) -> dict[str, str]:
    return queue_env(session_store, db=SESSION_DB)


@pytest.fixture(scope="session")
def worker(session_env, tmp_path_factory) -> Iterator[dict]:
    """One prefork worker (concurrency 1) for the session: ``{"process", "env", "log", "health", "node"}``."""
    flush(SESSION_DB)
    log = tmp_path_factory.mktemp("worker-logs") / "w1.log"
    process = start_worker(session_env, ("gpu", "cpu"), "w1", log_path=log)
    try:
        health = wait_worker_ready(session_env, "w1", process=process)
    except RuntimeError as e:
        stop_worker(process, timeout_s=5)
        pytest.fail(f"{e}\n--- worker log ---\n{log.read_text(errors='replace')[-4000:]}")
    yield {"process": process, "env": session_env, "log": log, "health": health, "node": node_name("w1")}
    stop_worker(process)
    flush(SESSION_DB)


@pytest.fixture(scope="session")
def client(worker):
    """A QueueClient on the session worker's broker and store."""
    client = client_for(worker["env"])
    yield client
    client.board.r.close()
