"""What the dashboard's page and ``/metrics`` cost in store requests on S3, whatever the job's size.

Real services only: moto's S3 server on loopback (``tests/s3_server.py``, every request botocore sends is
counted), a private ``redis-server``, finished jobs written with the job model's own functions
(``bench/dashboard.py``: manifest, pages, one completion record per chunk, board begin / finish, close,
summary), served by the real HTTP server of a fresh dashboard (nothing cached). The target is <= 100
requests per page or scrape on a 100,000-image job; the default run checks that the count does not grow
from 2,000 to 20,000 images, the slow run checks 100,000. Timings are the bench's (bench/dashboard.py),
never asserted here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from ops_helpers import compose_redis
from s3_server import S3Server, count_s3_requests

pytestmark = pytest.mark.integration
MAX_REQUESTS = 100  # issue 15's budget per page or scrape


def _bench():
    name = "slip_bench_dashboard"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[2] / "bench" / "dashboard.py"
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


@pytest.fixture(scope="module")
def clients(tmp_path_factory):
    """``clients(prefix)``: a QueueClient on the S3 store ``prefix`` (one job each) and the private Redis."""
    from jobs.settings import Settings
    from producer.client import QueueClient

    with S3Server() as server, pytest.MonkeyPatch.context() as mp, \
            compose_redis(tmp_path_factory.mktemp("redis")) as redis_server:
        for key, value in server.env.items():
            mp.setenv(key, value)
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        mp.delenv("AWS_PROFILE", raising=False)
        yield lambda prefix: QueueClient(Settings(broker_url=redis_server.url(), store=server.store_url(prefix)))


def _cost(client, job: str, path: str) -> dict:
    served = _bench().serve_once(client, path, count=count_s3_requests)
    assert served["status"] == 200, served["text"][:500]
    assert job in served["text"]
    return served


def _check_sizes(clients, sizes: tuple[int, ...]) -> None:
    bench = _bench()
    costs = {}
    for images in sizes:
        client = clients(f"cost-{images}")
        client.board.r.flushdb()
        job = bench.finished_job(client, images=images, batch_size=64, failed_every=997)
        for path in ("/", "/metrics"):
            costs[(images, path)] = _cost(client, job, path)["requests"]
        page = _cost(client, job, "/")["text"]
        assert f"{images - images // 997:,} of {images:,} images done, {images // 997:,} failed" in page
        client.board.r.flushdb()  # Redis lost every key: the job comes from the store's listing and summary
        for path in ("/", "/metrics"):
            costs[(images, f"{path} (Redis lost the job)")] = _cost(client, job, path)["requests"]
    for (images, path), requests in costs.items():
        assert requests <= MAX_REQUESTS, (images, path, requests)
    for path in {p for _, p in costs}:
        assert len({costs[(n, path)] for n in sizes}) == 1, f"{path}: cost grows with the job: {costs}"


def test_page_and_metrics_cost_the_same_few_requests_at_any_size(clients):
    _check_sizes(clients, (2_000, 20_000))


@pytest.mark.slow
def test_a_100k_image_job(clients):
    _check_sizes(clients, (100_000,))
