"""A real S3 endpoint for tests: moto's S3 server on a free loopback port, in this process, that can be
stopped and restarted on the same port (an outage in the middle of a real job).

Importable from every test folder (``tests/conftest.py`` puts ``tests/`` on ``sys.path``)::

    from s3_server import S3Server, count_s3_requests

    @pytest.fixture(scope="module")
    def s3():
        with S3Server() as server:          # started, with a fresh bucket
            yield server

    monkeypatch.setenv(...) for server.env  # AWS_ENDPOINT_URL, keys "testing", AWS_DEFAULT_REGION
    store = Store(server.store_url("slip"))
    with count_s3_requests(store) as counts:
        store.exists("jobs/j1/manifest.json")
    assert counts == {"HeadObject": 1}
    server.stop(); server.start()           # same port, same buckets and objects
    server.restart_after(2.0)               # stop now, start again in 2 s from a thread

Worker subprocesses reach it with ``{**os.environ, **server.env}``. Objects live in moto's in-process
state: they survive a restart and are shared by every server of this process (each gets its own
bucket).
"""

from __future__ import annotations

import socket
import threading
import uuid
from collections import Counter
from contextlib import contextmanager
from typing import Any, Iterator

from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import BaseWSGIServer, make_server

HOST = "127.0.0.1"
REGION = "us-east-1"


class _QuietHandler(MotoRequestHandler):
    """moto's request handler without a log line per request; remembers its connection so that
    :meth:`S3Server.stop` can cut kept-alive connections too."""

    def setup(self) -> None:
        super().setup()
        self.server.open_connections.add(self.connection)

    def finish(self) -> None:
        self.server.open_connections.discard(self.connection)
        super().finish()

    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass


class S3Server:
    """moto S3 on ``127.0.0.1:<port>`` (a free port on the first start, the same one afterwards) with
    one bucket; a context manager that starts it and stops it."""

    def __init__(self, *, bucket: str | None = None, port: int = 0) -> None:
        self.bucket = bucket or f"slip-test-{uuid.uuid4().hex[:12]}"
        self.port = port
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._bucket_made = False

    # --- life cycle ---------------------------------------------------------------------------------

    def start(self) -> "S3Server":
        """Serve (again) on the same port; creates the bucket on the first start."""
        if self.running:
            return self
        server = make_server(HOST, self.port, DomainDispatcherApplication(create_backend_app), threaded=True,
                             request_handler=_QuietHandler)
        server.open_connections = set()
        self._server, self.port = server, server.server_port
        self._thread = threading.Thread(target=server.serve_forever, name=f"moto-s3-{self.port}", daemon=True)
        self._thread.start()
        if not self._bucket_made:
            self.client().create_bucket(Bucket=self.bucket)
            self._bucket_made = True
        return self

    def stop(self) -> None:
        """Stop answering: close the listening socket and every open connection (requests get refused)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        for conn in list(server.open_connections):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=10)

    def restart_after(self, delay_s: float) -> threading.Thread:
        """Stop now and start again after ``delay_s`` seconds, from a background thread (returned: join it)."""
        self.stop()
        timer = threading.Timer(delay_s, self.start)
        timer.daemon = True
        timer.start()
        return timer

    @property
    def running(self) -> bool:
        return self._server is not None

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- how to reach it ----------------------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The AWS variables a process needs to use this server through botocore / s3fs."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def store_url(self, prefix: str = "slip") -> str:
        """``s3://<bucket>/<prefix>``: a SLIP_STORE on this server."""
        return f"s3://{self.bucket}/{prefix}".rstrip("/")

    def client(self):
        """A boto3 S3 client on this server (explicit settings: does not depend on the environment)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=REGION,
                            aws_access_key_id="testing", aws_secret_access_key="testing")


@contextmanager
def count_s3_requests(store: Any) -> Iterator[Counter]:
    """Count the HTTP requests ``store`` (a ``worker.store.Store`` on S3) sends inside the block, per S3
    operation (``Counter({"HeadObject": 2, "GetObject": 1})``); every attempt counts, failed ones too.

    Hooks botocore's ``before-send.s3`` event on the store's own s3fs client (each S3 Store has one)."""
    client = getattr(store.fs, "s3", None)
    if client is None:
        raise TypeError(f"{store!r} is not an S3 store")
    counts: Counter = Counter()

    def count(event_name: str, **_: Any) -> None:  # returns None: botocore sends the request as usual
        counts[event_name.rsplit(".", 1)[-1]] += 1

    client.meta.events.register("before-send.s3", count)
    try:
        yield counts
    finally:
        client.meta.events.unregister("before-send.s3", count)
