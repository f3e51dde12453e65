"""Servers the benchmarks own: a private ``redis-server`` on a free loopback port (its memory figures and
its restarts concern nobody else)."""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def private_redis(*, aof: bool = False, folder: Path | None = None) -> Iterator[str]:
    """A ``redis-server`` on 127.0.0.1:<free port> for the block; yields its URL (db 0)."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="slip-redis-") as tmp:
        where = folder or Path(tmp)
        args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(where),
                "--appendonly", "yes" if aof else "no"]
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        client = redis.Redis(port=port, socket_connect_timeout=1)
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    if client.ping():
                        break
                except redis.exceptions.ConnectionError:
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise RuntimeError(f"redis-server on port {port} did not start")
                    time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            client.close()
            process.terminate()
            process.wait(timeout=10)
