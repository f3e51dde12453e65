"""The queue over TLS: Redis run with docker-compose.tls.yml's own command line (TLS port, password,
certificates made here), a real ``celery -A worker worker`` and the ``slip`` commands, all with
``SLIP_BROKER_URL=rediss://:PASSWORD@localhost:PORT/0?ssl_cert_reqs=required&ssl_ca_certs=CA``. The job
finishes, and Redis's own client list shows every connection came in on the TLS port. A client that does
not trust the server's certificate, or speaks plain Redis to the TLS port, gets one line."""

from __future__ import annotations

import json
import socket
import sys

import numpy as np
import pytest
from PIL import Image

from ops_helpers import PASSWORD, base_env, compose_redis, make_certs, slip, start, stop

pytestmark = pytest.mark.integration
TINY = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--filters", "none"]
IMAGES = 2


def _images(folder) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        image = (rng.random((48, 64, 3)) * 60).astype(np.uint8)
        image[8:24, 10:30] = (220, 30, 30)
        Image.fromarray(image).save(folder / f"img_{i}.png")


def _queue_env(url: str, store) -> dict[str, str]:
    return base_env(SLIP_BROKER_URL=url, SLIP_STORE=str(store), SLIP_SAM="tiny-random", SLIP_CLIP="tiny-random",
                    SLIP_DEVICE="cpu", SLIP_TASK_TIME_LIMIT="120", SLIP_VISIBILITY_TIMEOUT="150")


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tls")
    with compose_redis(tmp / "redis", tls=make_certs(tmp / "certs")) as server:
        yield server


def test_a_job_runs_through_tls_redis(tls_server, tmp_path):
    url = tls_server.url(tls=True)
    env = _queue_env(url, tmp_path / "store")
    _images(tmp_path / "images")
    worker = start([sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q", "gpu,cpu", "--concurrency", "1",
                    "-n", "opstls@%h", "--loglevel", "INFO", "--without-mingle", "--without-gossip"],
                   env, tmp_path / "worker.log")
    try:
        done = slip(["submit", "segment", str(tmp_path / "images"), "--prompt", "a red box", "--wait", *TINY], env,
                    timeout=240)
        log = (tmp_path / "worker.log").read_text(errors="replace")
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:] + "\n--- worker ---\n" + log[-3000:]
        job = done.stdout.strip().splitlines()[0].strip()
        status = slip(["status", job, "--json"], env, timeout=60)
        assert status.returncode == 0, status.stderr[-2000:]
        report = json.loads(status.stdout)
        assert (report["done"], report["failed"], report["active"]) == (IMAGES, 0, False), report
        assert PASSWORD not in log + done.stdout + done.stderr, "the Redis password leaked into a log"
        assert f"rediss://:**@localhost:{tls_server.tls_port}" in log, "the worker names its (hidden) broker"

        client = tls_server.client(tls=True)
        try:
            ports = [int(c["laddr"].rsplit(":", 1)[1]) for c in client.client_list()]
        finally:
            client.close()
        assert len(ports) >= 3 and set(ports) == {tls_server.tls_port}, ports  # worker, its pool; this client
    finally:
        stop(worker, timeout_s=30)


def test_the_queue_refuses_an_untrusted_or_plain_connection(tls_server, tmp_path):
    untrusted = f"rediss://:{PASSWORD}@localhost:{tls_server.tls_port}/0?ssl_cert_reqs=required"
    plain = f"redis://:{PASSWORD}@localhost:{tls_server.tls_port}/0"
    _images(tmp_path / "images")
    for url, reason in ((untrusted, "certificate verify failed"), (plain, "")):
        done = slip(["submit", "segment", str(tmp_path / "images"), "--prompt", "x", *TINY],
                    _queue_env(url, tmp_path / "store"), timeout=90)
        lines = done.stderr.strip().splitlines()
        assert done.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-2000:]
        assert reason.lower() in lines[0].lower() and PASSWORD not in done.stderr


def test_tls_handshake_is_required_on_the_tls_port(tls_server):
    """A plain TCP client that sends a Redis command gets no Redis reply on the TLS port."""
    with socket.create_connection(("127.0.0.1", tls_server.tls_port), timeout=5) as s:
        s.sendall(b"PING\r\n")
        try:
            reply = s.recv(64)
        except (ConnectionResetError, socket.timeout):
            reply = b""
    assert b"PONG" not in reply
