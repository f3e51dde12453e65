"""``slip dashboard``: one read-only web page of the queue, its Prometheus metrics, and job galleries on demand.

    slip dashboard [--address 127.0.0.1] [--port 5556] [--basic-auth USER:PASSWORD]   # or FLOWER_BASIC_AUTH

Routes (every one behind HTTP basic auth, the same credentials as Flower: ``FLOWER_BASIC_AUTH`` =
``user:password``, several separated by commas; GET and HEAD only)::

    /                          the page: every job with a progress bar, rate, ETA, failures grouped by reason
                               with examples; the workers with heartbeat age, current chunk and rate; queue
                               depths. It reloads itself every ``refresh_s`` seconds.
    /api/state                 the same snapshot as JSON
    /metrics                   Prometheus text (:mod:`producer.metrics`)
    /healthcheck               "OK" (for a probe that has the credentials)
    /jobs/<job>/gallery/       the job's gallery (:mod:`producer.gallery`), rendered when asked for: kept for
                               a finished job, rendered again after ``gallery_ttl_s`` for a running one

Cost: a snapshot is the read API's (:class:`producer.client.QueueClient`: ``jobs()`` 2 Redis round trips,
``workers()`` 1, ``queue_depths()`` one broker connection) plus the failure groups of the jobs that have
failures (a finished job's: one GET of its summary, once: they are kept while its failed count stays); one
snapshot serves every request within ``min_interval_s``. The page and /metrics of a finished 100,000-image
job cost a handful of store requests (tests/ops/test_dashboard_cost.py).
"""

from __future__ import annotations

import base64
import hmac
import json
import re
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Optional

import typer

from slip.errors import ConfigError, SlipError

JOB_ROUTE = re.compile(r"/jobs/([0-9A-Za-z_-]{1,80})/gallery/(index\.html|thumbs/\d{1,9}\.jpg)?")
FAILURE_CACHE = 512  # jobs whose failure groups are kept


@dataclass(frozen=True)
class DashboardConfig:
    """How ``slip dashboard`` serves (the CLI builds it; nothing read from the environment here)."""

    credentials: tuple[str, ...]  # accepted "user:password" pairs (FLOWER_BASIC_AUTH's format)
    address: str = "127.0.0.1"  # interface to listen on
    port: int = 5556  # TCP port
    refresh_s: int = 5  # the page reloads itself this often
    jobs: int = 50  # newest jobs shown (active first)
    failure_examples: int = 3  # examples per failure group
    min_interval_s: float = 2.0  # one snapshot serves every request within this long
    gallery_limit: int = 100  # images in an on-demand gallery
    gallery_ttl_s: float = 60.0  # a running job's gallery is rendered again after this long

    def __post_init__(self) -> None:
        if not self.credentials or not all(":" in c and c.split(":", 1)[0] and c.split(":", 1)[1]
                                           for c in self.credentials):
            raise ConfigError("the dashboard needs basic auth: set FLOWER_BASIC_AUTH=user:password (the same "
                              "credentials as Flower) or pass --basic-auth user:password")


@dataclass(frozen=True)
class Snapshot:
    """What the page and /metrics show, read at ``taken`` (epoch seconds)."""

    taken: float
    jobs: list = field(default_factory=list)  # jobs.view.JobRow, newest first (active first)
    failures: dict = field(default_factory=dict)  # job id -> [jobs.status.FailureGroup], jobs with failures only
    workers: list = field(default_factory=list)  # jobs.view.WorkerRow
    depths: dict = field(default_factory=dict)  # queue -> messages waiting
    errors: dict = field(default_factory=dict)  # part (jobs | workers | queues) -> one line: what went wrong

    def to_json(self) -> dict:
        return {"taken": self.taken, "jobs": [r.to_json() for r in self.jobs],
                "failures": {j: [g.to_json() for g in groups] for j, groups in self.failures.items()},
                "workers": [w.to_json() for w in self.workers], "depths": self.depths, "errors": self.errors}


class Dashboard:
    """Snapshots (cached ``min_interval_s``), failure groups (cached per job and failed count) and galleries
    (rendered on demand into a temporary folder) for one :class:`QueueClient`."""

    def __init__(self, client, config: DashboardConfig, *,
                 open_job: Callable[..., object] | None = None) -> None:
        from producer.metrics import metrics_registry
        from producer.results_cli import open_job as default_open_job

        self.client, self.config = client, config
        self.open_job = open_job or default_open_job
        self.registry = metrics_registry(self.snapshot)
        self._lock, self._gallery_lock = threading.Lock(), threading.Lock()
        self._last: Snapshot | None = None
        self._failures: dict[tuple[str, int], list] = {}
        self._galleries: dict[str, tuple[float, bool]] = {}  # job -> (rendered at, job was finished)
        self._folder = tempfile.TemporaryDirectory(prefix="slip-dashboard-")

    def close(self) -> None:
        self._folder.cleanup()

    # --- the snapshot -------------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """The queue now (or as read less than ``min_interval_s`` ago)."""
        with self._lock:
            if self._last is None or time.time() - self._last.taken >= self.config.min_interval_s:
                self._last = self._read()
            return self._last

    def _read(self) -> Snapshot:
        snap = Snapshot(taken=time.time())
        reads = (("jobs", lambda: snap.jobs.extend(self.client.jobs(limit=self.config.jobs))),
                 ("workers", lambda: snap.workers.extend(self.client.workers())),
                 ("queues", lambda: snap.depths.update(self.client.queue_depths())))
        for part, read in reads:
            try:
                read()
            except Exception as e:  # noqa: BLE001 - a part that cannot be read is shown as such, the rest still is
                snap.errors[part] = f"{type(e).__name__}: {e}"
        for row in snap.jobs:
            if row.failed:
                try:
                    snap.failures[row.job_id] = self._failure_groups(row.job_id, row.failed)
                except SlipError as e:
                    snap.errors.setdefault("jobs", f"failures of {row.job_id}: {e}")
        return snap

    def _failure_groups(self, job_id: str, failed: int) -> list:
        key = (job_id, failed)
        if key not in self._failures:
            if len(self._failures) >= FAILURE_CACHE:
                self._failures.pop(next(iter(self._failures)))
            self._failures[key] = self.client.failures(job_id, examples=self.config.failure_examples)
        return self._failures[key]

    # --- galleries ----------------------------------------------------------------------------------

    def gallery(self, job_id: str) -> Path:
        """The job's gallery folder (``index.html``, ``thumbs/``), rendered now unless a fresh one exists."""
        from producer.gallery import write_gallery

        with self._gallery_lock:
            out = Path(self._folder.name) / job_id
            rendered = self._galleries.get(job_id)
            if rendered and (rendered[1] or time.time() - rendered[0] < self.config.gallery_ttl_s):
                return out
            finished = self.client.job(job_id).state == "finished"
            source = self.open_job(job_id, client=self.client)
            shutil.rmtree(out, ignore_errors=True)
            write_gallery(source.items, out=out, prompts=source.prompts, job_id=job_id, title=f"SLIP job {job_id}",
                          note=f"Models: {source.models}. The first {self.config.gallery_limit} images.",
                          limit=self.config.gallery_limit)
            self._galleries[job_id] = (time.time(), finished)
            return out


# --- HTTP ----------------------------------------------------------------------------------------------


def make_server(dashboard: Dashboard) -> ThreadingHTTPServer:
    """A threading HTTP server bound to the config's address and port (port 0: a free one)."""
    config = dashboard.config

    class Handler(_Handler):
        pass

    Handler.dashboard = dashboard
    Handler.accepted = tuple(c.encode() for c in config.credentials)
    try:
        server = ThreadingHTTPServer((config.address, config.port), Handler)
    except OSError as e:
        raise ConfigError(f"cannot listen on {config.address}:{config.port}: {e.strerror or e} (pick another --port)") from e
    server.daemon_threads = True
    return server


class _Handler(BaseHTTPRequestHandler):
    dashboard: Dashboard
    accepted: tuple[bytes, ...]
    server_version = "slip-dashboard"

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self.do_GET(body=False)

    def do_GET(self, body: bool = True) -> None:  # noqa: N802
        if not self._authorised():
            return self._send(401, b"authentication required\n", "text/plain", body=body,
                              headers={"WWW-Authenticate": 'Basic realm="slip dashboard"'})
        path = self.path.split("?", 1)[0]
        try:
            status, data, kind = self._route(path)
        except SlipError as e:  # an unknown job, a job that is not a segment job, ...
            status, data, kind = 404, f"{e}\n".encode(), "text/plain; charset=utf-8"
        except Exception as e:  # noqa: BLE001 - one line to the browser, the server keeps serving
            status, data, kind = 500, f"error: {type(e).__name__}: {e}\n".encode(), "text/plain; charset=utf-8"
        self._send(status, data, kind, body=body)

    def _route(self, path: str) -> tuple[int, bytes, str]:
        from producer.dashboard_page import render_page
        from producer.metrics import CONTENT_TYPE, exposition

        board = self.dashboard
        if path in ("/", "/index.html"):
            return 200, render_page(board.snapshot(), board.config).encode(), "text/html; charset=utf-8"
        if path == "/api/state":
            return 200, json.dumps(board.snapshot().to_json()).encode(), "application/json"
        if path == "/metrics":
            return 200, exposition(board.registry), CONTENT_TYPE
        if path == "/healthcheck":
            return 200, b"OK", "text/plain"
        match = JOB_ROUTE.fullmatch(path)
        if match:
            folder = board.gallery(match.group(1))
            name = match.group(2) or "index.html"
            kind = "image/jpeg" if name.endswith(".jpg") else "text/html; charset=utf-8"
            file = folder / name
            return (200, file.read_bytes(), kind) if file.is_file() else (404, b"not found\n", "text/plain")
        return 404, b"not found\n", "text/plain"

    def _authorised(self) -> bool:
        header = self.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            given = base64.b64decode(token.strip(), validate=True)
        except ValueError:
            return False
        return any(hmac.compare_digest(given, accepted) for accepted in self.accepted)

    def _send(self, status: int, data: bytes, kind: str, *, body: bool = True, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # one quiet server: errors only
        pass


def parse_credentials(value: str | None) -> tuple[str, ...]:
    """``"user:password[,user2:password2]"`` (Flower's FLOWER_BASIC_AUTH) -> the pairs."""
    return tuple(c.strip() for c in (value or "").split(",") if c.strip())


def serve(client, config: DashboardConfig, *, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve until interrupted; Ctrl-C and SIGTERM end it cleanly (call from the main thread)."""
    dashboard = Dashboard(client, config)
    server = make_server(dashboard)
    signal.signal(signal.SIGTERM, _exit)
    host, port = server.server_address[:2]
    if on_ready:
        on_ready(f"http://{host}:{port}/")
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        dashboard.close()


def _exit(signum, frame) -> None:
    raise SystemExit(0)


def dashboard_command(
    address: str = typer.Option("127.0.0.1", "--address", help="Interface to listen on (0.0.0.0: every one)."),
    port: int = typer.Option(5556, "--port", min=0, max=65535, help="TCP port."),
    basic_auth: Optional[str] = typer.Option(
        None, "--basic-auth", help="user:password[,user2:password2]; default FLOWER_BASIC_AUTH (Flower's)."),
    refresh: int = typer.Option(5, "--refresh", min=1, help="Seconds between the page's reloads."),
    jobs: int = typer.Option(50, "--jobs", min=1, max=1000, help="Newest jobs shown."),
) -> None:
    """Serve a read-only web page of the queue (jobs, failures, workers, queues) and its Prometheus metrics."""
    import os

    from producer.common import client_from_env, queue_errors

    with queue_errors():
        config = DashboardConfig(credentials=parse_credentials(basic_auth or os.environ.get("FLOWER_BASIC_AUTH")),
                                 address=address, port=port, refresh_s=refresh, jobs=jobs)
        serve(client_from_env(), config,
              on_ready=lambda url: typer.echo(f"dashboard on {url} (metrics: {url}metrics); Ctrl-C stops it"))
