"""Processes the queue benchmarks run for real and kill: a private ``redis-server`` that can be SIGKILLed and
restarted from its append-only file, ``celery -A worker worker`` processes in their own sessions, and a
supervisor that restarts a worker whose main process died (as systemd or Kubernetes would).
Used by ``bench/chaos.py``, ``bench/bulk.py`` and the queue tests that import them by path."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

import redis

from bench.servers import free_port

ROOT = Path(__file__).resolve().parents[1]
WORKER_READY_S = 180.0  # a loaded 2-core machine may take this long to start a worker


class RedisServer:
    """A private ``redis-server`` (its own port and folder, AOF fsynced on every write) that can be
    SIGKILLed and started again on the same port from the same AOF."""

    def __init__(self, folder: Path, *, port: int | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        self.restarts = 0

    def start(self, timeout_s: float = 30.0) -> "RedisServer":
        with open(self.folder / "redis.log", "ab") as log:
            self.process = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                 "yes", "--appendfsync", "always", "--dir", str(self.folder)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    if client.ping():
                        return self
                except (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError):
                    if time.monotonic() > deadline or self.process.poll() is not None:
                        raise RuntimeError(f"redis-server on port {self.port} did not start "
                                           f"(log: {self.folder / 'redis.log'})") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown save; only what the AOF holds survives."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self) -> None:
        self.kill()
        self.start()
        self.restarts += 1

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, **options) -> redis.Redis:
        return redis.Redis(port=self.port, **options)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


def worker_env(broker_url: str, store: str | Path, **overrides: str) -> dict[str, str]:
    """Environment of workers and producers: tiny-random models on CPU, one torch thread per worker, the
    queue's default timing settings (every other ``SLIP_*`` variable of this process dropped)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIP_")}
    env.update(
        SLIP_BROKER_URL=broker_url, SLIP_STORE=str(store), SLIP_SAM="tiny-random", SLIP_CLIP="tiny-random",
        SLIP_DEVICE="cpu", SLIP_THREADS="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    env.update(overrides)
    return env


def node_name(name: str) -> str:
    """The Celery node name of a worker started as ``-n <name>@%h``."""
    return f"{name}@{socket.gethostname()}"


def children_of(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (a prefork worker's pool processes)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


class Worker:
    """One ``celery -A worker worker`` process (prefork, concurrency 1) in its own session, restartable."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path, *, queues: str = "gpu,cpu") -> None:
        self.name = name
        self.node = node_name(name)
        self.env = env
        self.log_path = Path(log_dir) / f"{name}.log"
        self.queues = queues
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0  # epoch seconds of the current process's start
        self.pool_killed_at = 0.0  # epoch seconds of the last pool kill
        self.starts = 0
        self.lock = threading.Lock()

    def start(self) -> "Worker":
        command = [sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q", self.queues, "-n",
                   f"{self.name}@%h", "-P", "prefork", "--concurrency", "1", "--loglevel", "INFO",
                   "--without-mingle", "--without-gossip"]
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== bench: start {self.starts + 1} at {time.time():.3f} ===\n".encode())
            log.flush()
            self.process = subprocess.Popen(command, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        self.started_at = time.time()
        self.starts += 1
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def pool_pids(self) -> list[int]:
        return children_of(self.pid) if self.alive else []

    def kill_main(self) -> None:
        """SIGKILL the whole process group: main process and pool, as when the machine dies."""
        if self.alive:
            os.killpg(self.pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait()

    def kill_pool(self) -> list[int]:
        """SIGKILL the pool processes only (the main process forks new ones); the pids killed."""
        pids = self.pool_pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.pool_killed_at = time.time()
        return pids

    def stop(self, timeout_s: float = 20.0) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL of the group if it lingers."""
        if self.alive:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.process.wait()

    def log_text(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""


class Supervisor:
    """A process manager's restart loop: a worker whose main process is gone is started again after
    ``delay_s`` (a background thread; :meth:`stop` ends it)."""

    def __init__(self, workers: Sequence[Worker], *, delay_s: float = 1.0, poll_s: float = 0.25) -> None:
        self.workers = list(workers)
        self.delay_s = delay_s
        self.poll_s = poll_s
        self.restarts = 0
        self._dead_since: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)

    def start(self) -> "Supervisor":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            for worker in self.workers:
                with worker.lock:
                    if worker.alive or worker.process is None:
                        self._dead_since.pop(worker.name, None)
                        continue
                    since = self._dead_since.setdefault(worker.name, time.monotonic())
                    if time.monotonic() - since >= self.delay_s:
                        worker.start()
                        self.restarts += 1
                        self._dead_since.pop(worker.name, None)


def client_for(env: dict[str, str]):
    """A :class:`producer.client.QueueClient` for ``env`` (built in this process)."""
    from jobs.settings import Settings
    from producer.client import QueueClient

    return QueueClient(Settings.from_env(env))


def wait_ready(client, workers: Sequence[Worker], timeout_s: float = WORKER_READY_S) -> None:
    """Until every worker's pool process answers a health check with its models loaded."""
    from celery.exceptions import TimeoutError as CeleryTimeout

    deadline = time.monotonic() + timeout_s
    for worker in workers:
        while True:
            if not worker.alive:
                raise RuntimeError(f"worker {worker.name} exited before it was ready:\n{worker.log_text()}")
            try:
                report = client.health(worker.node, timeout_s=5.0)
                if report.get("models_loaded"):
                    break
            except CeleryTimeout:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {worker.name} not ready after {timeout_s} s:\n{worker.log_text()}")


def stop_all(workers: Sequence[Worker]) -> None:
    """Stop every worker (warm shutdowns in parallel, then whatever lingers is SIGKILLed)."""
    for worker in workers:
        if worker.alive:
            worker.process.send_signal(signal.SIGTERM)
    for worker in workers:
        worker.stop(timeout_s=20.0)


