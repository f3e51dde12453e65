"""What one status poll costs: O(chunks / 1000) store requests and one Redis round trip, never one per image.

Real services only: the store is S3 (moto's server on loopback, ``tests/s3_server.py``) and each request
botocore sends is counted (``count_s3_requests``); Redis is a private ``redis-server`` whose own
``INFO commandstats`` counts the commands, while the client's socket writes are counted by wrapping redis-py's
``Connection.send_packed_command`` (a pipeline is one write: one round trip).

The jobs are written with the ledger's own functions, as a finished run leaves them: the manifest and its
item pages, one completion record per chunk (``jobs/<id>/done/c<chunk>-<letters>.json``), and the job
registered in Redis with chunks sent and running (``jobs.board``). No worker is needed to count what a reader
pays.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import redis

from queue_helpers import bench_module
from s3_server import S3Server, count_s3_requests

BATCH = 4  # images per chunk (the producer's default)
N = 256  # images of the small job; the large one has 4 N (1024 images, 256 chunks: one listing page)
MAX_STORE_REQUESTS = 5  # the manifest GET and one LIST page, with room for a HEAD or two


def _bench_chaos():
    return bench_module("chaos")


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with S3Server() as server, pytest.MonkeyPatch.context() as mp:
        for key, value in server.env.items():
            mp.setenv(key, value)
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        mp.delenv("AWS_PROFILE", raising=False)
        yield server


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory):
    chaos = _bench_chaos()
    with chaos.RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def client(s3, private_redis):
    from jobs.settings import Settings
    from jobs.store import Store
    from producer.client import QueueClient

    settings = Settings(broker_url=private_redis.url(), store=s3.store_url("status-cost"))
    return QueueClient(settings, store=Store(settings.store))


def finished_job(client, images: int, *, running: int = 2, sent: int = 3, filters: str | None = None) -> str:
    """A job of ``images`` images as a run leaves it in the store (manifest, pages, one completion record
    per chunk, the last ``running + sent`` chunks without one), registered in Redis with ``running``
    chunks held by a worker and ``sent`` more queued. Its id."""
    from jobs.ledger import record_chunk, write_job
    from jobs.model import ChunkRecord, Item, ItemOutcome, JobManifest
    from jobs.reaper import mark_json
    from jobs.segment import SegmentSpec
    from slip.options import SegmentOptions

    job = f"cost-{images}" + ("" if filters is None else "-filters")
    items = []
    for i in range(images):
        sha = hashlib.sha256(f"{job}-{i}".encode()).hexdigest()
        items.append(Item(index=i, image_key=f"inputs/{sha}.png", image_sha=sha, name=f"img_{i:05d}.png"))
    manifest = JobManifest(job_id=job, created="2026-01-01T00:00:00+00:00", batch_size=BATCH, total=images,
                           spec=SegmentSpec(prompts=("a red box",), sam="tiny-random", clip="tiny-random",
                                            options=SegmentOptions(filters=filters)),
                           page_size=JobManifest.page_size_for(BATCH))
    write_job(client.store, manifest, items)
    open_chunks = running + sent
    finished = range(manifest.chunks - open_chunks)

    def record(chunk: int) -> None:
        outcomes = [ItemOutcome(index=i, state="done", result_key=f"results/{items[i].image_sha}/{'0' * 64}",
                                how="computed", found=[1]) for i in manifest.chunk_range(chunk)]
        record_chunk(client.store, ChunkRecord(job_id=job, chunk=chunk, task_id=f"t{chunk}", worker="w@h",
                                               finished="2026-01-01T00:00:01+00:00", items=outcomes),
                     replace_earlier=False)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(record, finished))
    board = client.board
    board.register(job, kind="segment", chunks=manifest.chunks, total=images, window=manifest.chunks, created=1.0)
    assert board.claim(job) == list(range(manifest.chunks))
    marks = {c: mark_json({"attempt": 0, "worker": "instance", "pid": 1, "node": "w@h", "at": 1.0})
             for c in range(manifest.chunks)}
    for chunk in [*finished, *range(manifest.chunks - running, manifest.chunks)]:
        assert board.begin(job, chunk, 0, marks[chunk])
    for chunk in finished:
        board.finish(job, chunk, 0, marks[chunk], again=False, done=BATCH, failed=0)
    return job


@pytest.fixture(scope="module")
def jobs(client) -> dict[int, str]:
    """Images -> job id: N and 4 N images."""
    return {n: finished_job(client, n) for n in (N, 4 * N)}


@contextmanager
def round_trips() -> Iterator[list[int]]:
    """Counts the commands (or pipelines) redis-py writes to a socket inside the block: round trips."""
    original = redis.connection.AbstractConnection.send_packed_command
    count = [0]

    def send(self, command, check_health=True):
        count[0] += 1
        return original(self, command, check_health)

    redis.connection.AbstractConnection.send_packed_command = send
    try:
        yield count
    finally:
        redis.connection.AbstractConnection.send_packed_command = original


def command_stats(server) -> dict[str, int]:
    """``INFO commandstats`` of the private Redis: command -> calls so far."""
    client = server.client()
    try:
        return {name.removeprefix("cmdstat_"): stats["calls"] for name, stats in client.info("commandstats").items()}
    finally:
        client.close()


def test_status_counts_are_right(client, jobs):
    client.board.beat("instance", {"node": "w@h", "at": __import__("time").time()})  # the holder is alive
    for images, job in jobs.items():
        chunks = images // BATCH
        counts = client.status(job).counts
        assert counts == {"done": (chunks - 5) * BATCH, "failed": 0, "running": 2 * BATCH, "queued": 3 * BATCH,
                          "waiting": 0, "lost": 0}, (images, counts)


def test_a_status_poll_costs_a_few_store_requests_whatever_the_job_size(client, jobs):
    costs = {}
    for images, job in jobs.items():
        client.status(job)  # warm: credentials, connection pool
        with count_s3_requests(client.store) as counts:
            client.status(job)
        costs[images] = dict(counts)
    small, large = (sum(costs[n].values()) for n in (N, 4 * N))
    assert small <= MAX_STORE_REQUESTS and large <= MAX_STORE_REQUESTS, costs
    assert large == small, f"a status poll costs more store requests for 4x the images: {costs}"
    print(f"store requests of one status poll: {costs}")
    assert costs[4 * N].get("ListObjectsV2", 0) == 1, costs  # 251 records: one page of the done/ listing


def test_a_status_poll_is_one_redis_round_trip_whatever_the_job_size(client, jobs, private_redis):
    for images, job in jobs.items():
        client.status(job)  # warm: the connection is open, its health check fresh
        before = command_stats(private_redis)
        with round_trips() as trips:
            client.status(job)
        after = command_stats(private_redis)
        delta = {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}
        delta.pop("info", None)  # the reading of the stats itself
        assert trips[0] == 1, f"{images} images: {trips[0]} Redis round trips for one status poll"
        assert sum(delta.values()) <= 8, f"{images} images: commands of one status poll: {delta}"
        assert "hgetall" in delta and "scan" not in delta and "keys" not in delta, delta


def test_slip_status_imports_no_model_code(client, s3, private_redis):
    """`slip status` is a fresh process each time: it must not pay for torch (seconds) to count a job, here one
    submitted with an explicit filter chain (`--filters none`)."""
    job = finished_job(client, 8, running=0, sent=0, filters="none")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLIP_")},
           "SLIP_BROKER_URL": private_redis.url(), "SLIP_STORE": s3.store_url("status-cost"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "producer", "status", job, "--json"], env=env,
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["done"] == 8
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    heavy = sorted(imported & {"torch", "transformers", "segment_anything"})
    assert not heavy, f"`slip status` imported {heavy} (a manifest with a filter chain is validated with slip.filters)"
