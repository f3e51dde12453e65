"""``slip dashboard`` over a real queue: Redis (compose's command line, with its password), a real
``celery -A worker worker`` (tiny-random models), a job with one corrupt image submitted through ``slip``,
then the dashboard as a ``slip dashboard`` process. Checked: basic auth on every route, the snapshot's
jobs / failures / workers / queues, the Prometheus text parsed by ``prometheus_client``'s own parser, the
page in headless Chromium (DOM and screenshot), the gallery rendered on demand, and the page refreshing
itself in a real browser (an in-process server counting the snapshots it serves)."""

from __future__ import annotations

import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from browser import chromium, wait_http
from ops_helpers import base_env, compose_redis, free_port, slip, start, stop

pytestmark = pytest.mark.integration
AUTH = ("ops", "dash-s3cret")
GOOD = 5  # images that segment
TINY = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--filters", "none"]
PROMPTS = ("a red box", "a blue disc")
SCREENSHOT_ENV = "SLIP_DASHBOARD_SCREENSHOT"  # set to a path to keep the screenshot (docs/dashboard.png)


def _images(folder: Path) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(GOOD):
        image = (rng.random((48, 64, 3)) * 60).astype(np.uint8)
        image[8:24, 10:30] = (220, 30, 30)
        Image.fromarray(image).save(folder / f"img_{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dashboard")
    with compose_redis(tmp / "redis") as server:
        env = base_env(SLIP_BROKER_URL=server.url(), SLIP_STORE=str(tmp / "store"), SLIP_SAM="tiny-random",
                       SLIP_CLIP="tiny-random", SLIP_DEVICE="cpu", SLIP_TASK_TIME_LIMIT="120",
                       SLIP_VISIBILITY_TIMEOUT="150", FLOWER_BASIC_AUTH=f"{AUTH[0]}:{AUTH[1]}")
        _images(tmp / "images")
        worker = start([sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q", "gpu,cpu", "--concurrency",
                        "1", "-n", "opsdash@%h", "--loglevel", "INFO", "--without-mingle", "--without-gossip"],
                       env, tmp / "worker.log")
        port = free_port()
        dashboard = start([sys.executable, "-m", "producer", "dashboard", "--port", str(port), "--refresh", "2"], env,
                          tmp / "dashboard.log")
        try:
            prompts = [a for p in PROMPTS for a in ("--prompt", p)]
            done = slip(["submit", "segment", str(tmp / "images"), *prompts, "--wait", "--batch-size", "2", *TINY],
                        env, timeout=240)
            job = done.stdout.strip().splitlines()[0].strip() if done.stdout.strip() else ""
            assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", job), done.stdout + done.stderr + \
                (tmp / "worker.log").read_text(errors="replace")[-3000:]
            base = f"http://127.0.0.1:{port}"
            wait_http(f"{base}/healthcheck", dashboard, tmp / "dashboard.log", what="the dashboard")
            yield {"base": base, "port": port, "job": job, "env": env, "tmp": tmp}
        finally:
            stop(dashboard)
            stop(worker, timeout_s=30)


def _get(stack, path: str, **kwargs) -> requests.Response:
    return requests.get(f"{stack['base']}{path}", timeout=60, **kwargs)


@pytest.mark.parametrize("path", ["/", "/api/state", "/metrics", "/healthcheck", "/jobs/x/gallery/", "/nowhere"])
def test_every_route_needs_the_credentials(stack, path):
    assert _get(stack, path).status_code == 401
    assert _get(stack, path, auth=(AUTH[0], "wrong")).status_code == 401
    assert _get(stack, path, headers={"Authorization": "Basic !!!"}).status_code == 401
    assert _get(stack, path, auth=AUTH).status_code in (200, 404)
    assert requests.post(f"{stack['base']}{path}", auth=AUTH, timeout=10).status_code == 501, "read-only"


def _worker(state: dict) -> dict:
    (worker,) = [w for w in state["workers"] if w["node"].startswith("opsdash@")]
    return worker


def test_state_has_the_job_its_failures_the_worker_and_the_queues(stack):
    deadline = time.monotonic() + 30
    while True:  # the worker's count of units reaches its heartbeat record at its next beat
        state = _get(stack, "/api/state", auth=AUTH).json()
        if _worker(state)["units"] == GOOD + 1 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert state["errors"] == {}
    (row,) = [r for r in state["jobs"] if r["job_id"] == stack["job"]]
    assert (row["kind"], row["state"], row["total"], row["done"], row["failed"]) == \
        ("segment", "finished", GOOD + 1, GOOD, 1)
    assert row["rate"] > 0
    (group,) = state["failures"][stack["job"]]
    assert group["count"] == 1 and group["permanent"] and group["examples"][0]["name"] == "broken.png"
    worker = _worker(state)
    assert worker["alive"] and 0 <= worker["heartbeat_age_s"] < 60 and worker["units"] == GOOD + 1
    assert state["depths"] == {"gpu": 0, "cpu": 0}


def test_metrics_parse_with_prometheus_clients_parser(stack):
    response = _get(stack, "/metrics", auth=AUTH)
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    job = stack["job"]
    units = {state: samples[("slip_job_units", (("job_id", job), ("kind", "segment"), ("state", state),
                                                ("unit", "image")))] for state in ("done", "failed", "unfinished")}
    assert units == {"done": GOOD, "failed": 1, "unfinished": 0}
    assert samples[("slip_job_finished_units_total", (("job_id", job), ("kind", "segment")))] == GOOD + 1
    assert samples[("slip_job_active", (("job_id", job), ("kind", "segment")))] == 0
    assert samples[("slip_job_rate_units_per_second", (("job_id", job), ("kind", "segment")))] > 0
    assert samples[("slip_job_in_flight_chunks", (("job_id", job), ("kind", "segment")))] == 0
    assert samples[("slip_queue_depth", (("queue", "gpu"),))] == 0
    heartbeat = [v for (name, labels), v in samples.items() if name == "slip_worker_heartbeat_age_seconds"
                 and dict(labels)["node"].startswith("opsdash@")]
    assert len(heartbeat) == 1 and 0 <= heartbeat[0] < 60
    assert all(samples[("slip_dashboard_read_errors", (("part", p),))] == 0 for p in ("jobs", "workers", "queues"))


def test_page_in_headlesschromium(stack, tmp_path):
    url = f"http://{AUTH[0]}:{AUTH[1]}@127.0.0.1:{stack['port']}/"
    dom = chromium("--dump-dom", url).stdout
    job = stack["job"]
    for text in (job, "images/s", "5 of 6 images done, 1 failed", "broken.png", "not an image", "permanent",
                 "opsdash@", "alive", "gpu:", "Prometheus metrics"):
        assert text in dom, text
    assert f'href="jobs/{job}/gallery/"' in dom
    assert re.search(r'<span class="done" style="width:83\.33%"', dom) and 'class="failed"' in dom
    shot = tmp_path / "dashboard.png"
    chromium(f"--screenshot={shot}", "--window-size=1280,720", url)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    for colour in ((0x2E, 0x9D, 0x5B), (0xD6, 0x45, 0x45)):  # the bar's done and failed parts
        assert (np.abs(pixels - colour).sum(-1) < 30).sum() > 300, colour
    if os.environ.get(SCREENSHOT_ENV):
        shutil.copyfile(shot, os.environ[SCREENSHOT_ENV])


def test_gallery_is_rendered_on_demand(stack):
    job = stack["job"]
    page = _get(stack, f"/jobs/{job}/gallery/", auth=AUTH)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert all(p in page.text for p in PROMPTS) and page.text.count("<figure") == GOOD + 1
    thumbs = re.findall(r'src="(thumbs/\d+\.jpg)"', page.text)
    assert len(thumbs) == GOOD
    thumb = _get(stack, f"/jobs/{job}/gallery/{thumbs[0]}", auth=AUTH)
    assert thumb.headers["Content-Type"] == "image/jpeg" and thumb.content[:2] == b"\xff\xd8"
    assert _get(stack, "/jobs/20260101-000000-abcdef/gallery/", auth=AUTH).status_code == 404
    assert _get(stack, f"/jobs/{job}/gallery/../../api/state", auth=AUTH).status_code in (200, 404)


def test_the_page_refreshes_itself_in_a_browser(stack):
    """An in-process dashboard (the same classes ``slip dashboard`` serves) counting its snapshots: a real
    browser left on the page for 7 s of (virtual) time fetches it again every 2 s."""
    from jobs.settings import Settings
    from producer.client import QueueClient
    from producer.dashboard import Dashboard, DashboardConfig, make_server

    class Counting(Dashboard):
        served = 0

        def snapshot(self):
            Counting.served += 1
            return super().snapshot()

    config = DashboardConfig(credentials=(f"{AUTH[0]}:{AUTH[1]}",), port=0, refresh_s=2, min_interval_s=0)
    dashboard = Counting(QueueClient(Settings.from_env(stack["env"])), config)
    server = make_server(dashboard)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        dom = chromium("--virtual-time-budget=7000", "--dump-dom", f"http://{AUTH[0]}:{AUTH[1]}@127.0.0.1:{port}/").stdout
        assert stack["job"] in dom
        assert Counting.served >= 3, f"the page was read {Counting.served} times in 7 s with a 2 s refresh"
    finally:
        server.shutdown()
        server.server_close()
        dashboard.close()
