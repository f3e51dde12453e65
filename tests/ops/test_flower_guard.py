"""Flower as docker-compose.yml runs it (its command, its environment: Redis URL with the password, basic
auth), against a real Redis run with compose's own command line: every page, ``/metrics`` and
``/healthcheck`` included, answers 401 without valid credentials; with them, ``/metrics`` is Prometheus
text and ``/healthcheck`` says OK. Plain ``celery flower`` leaves those two open, which is why compose
goes through :mod:`producer.flower_guard`."""

from __future__ import annotations

import sys

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from browser import wait_http
from compose_file import COMPOSE, load_compose
from ops_helpers import COMPOSE_ENV, base_env, compose_redis, free_port, start, stop

pytestmark = pytest.mark.integration
AUTH = (COMPOSE_ENV["FLOWER_USER"], COMPOSE_ENV["FLOWER_PASSWORD"])


@pytest.fixture(scope="module")
def flower(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flower")
    service = load_compose(COMPOSE, env=COMPOSE_ENV)["services"]["flower"]
    command = [str(a) for a in service["command"]]
    assert command[:3] == ["python", "-m", "producer.flower_guard"], command
    with compose_redis(tmp / "redis") as server:
        env = {k: str(v) for k, v in service["environment"].items()}
        assert env["SLIP_BROKER_URL"].startswith(f"redis://:{COMPOSE_ENV['REDIS_PASSWORD']}@redis:6379/")
        env["SLIP_BROKER_URL"] = server.url(db=2)  # the container's URL, moved to this machine's port
        port = free_port()
        process = start([sys.executable, *command[1:], f"--port={port}", "--address=127.0.0.1"],
                        base_env(**env), tmp / "flower.log")
        base = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{base}/api/workers", process, tmp / "flower.log", what="Flower")
            yield base
        finally:
            stop(process, timeout_s=10)


@pytest.mark.parametrize("path", ["/metrics", "/healthcheck", "/api/workers", "/"])
def test_every_page_needs_the_credentials(flower, path):
    assert requests.get(f"{flower}{path}", timeout=10).status_code == 401
    assert requests.get(f"{flower}{path}", auth=(AUTH[0], "wrong"), timeout=10).status_code == 401
    assert requests.get(f"{flower}{path}", auth=AUTH, timeout=30).status_code == 200


def test_metrics_and_healthcheck_work_with_the_credentials(flower):
    metrics = requests.get(f"{flower}/metrics", auth=AUTH, timeout=30)
    names = {family.name for family in text_string_to_metric_families(metrics.text)}
    assert any(name.startswith("flower_") for name in names), sorted(names)
    assert requests.get(f"{flower}/healthcheck", auth=AUTH, timeout=10).text == "OK"
