"""Per-process worker resources: settings, store, Redis, the sender, job manifests and the warm models.

Models are loaded ONCE per worker process, in the process that uses them: the Celery signal
``worker_process_init`` fires in each prefork child after the fork (and once in a ``-P solo`` worker),
never in the parent that forks (CUDA cannot survive a fork). Tasks never load the engine's models; they ask
the app's :class:`ResourceHolder` for the process's :class:`WorkerResources`, whose :class:`worker.models.WarmModels`
assembles an engine per request (loading a ranker a job names on first use).

The holder is the one piece of per-process mutable state, and it hangs off the Celery app object
(``app.slip_resources``), not off a module global.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from jobs.board import Board, connect
from jobs.broker import MODEL_QUEUE, Send
from jobs.ledger import chunk_items, load_manifest, load_page
from jobs.model import Item, JobManifest
from jobs.segment import SegmentSpec
from jobs.settings import Settings
from jobs.store import Store
from slip.errors import ConfigError, SlipError
from slip.options import SegmentOptions

log = logging.getLogger("slip.worker")

JOB_CACHE = 16  # manifests (and their pages) kept per process


@dataclass
class WorkerResources:
    """What one worker process holds for its whole life."""

    settings: Settings
    store: Store
    board: Board  # the jobs' keys in Redis (the broker's Redis)
    send: Send  # sends a chunk's message (a retry of its failures, the job's next chunks)
    models: Any | None  # worker.models.WarmModels on settings.models.device; None on a cpu-only worker
    load_seconds: float  # time spent loading the models
    instance: str = ""  # this worker's id (its main process), named in heartbeats and running marks
    units: Any = None  # a shared counter (multiprocessing.Value) of the units this worker finished
    sam: Any | None = None  # the warm SAM (ProposerModel; Sam3Bundle for the sam3 engines), for training kinds
    ranker: Any | None = None  # SLIP_CLIP's RankerBundle, warm (None for sam3), for training kinds
    pid: int = field(default_factory=os.getpid)
    hostname: str = field(default_factory=socket.gethostname)
    _jobs: OrderedDict = field(default_factory=OrderedDict)  # job id -> (manifest, its pages by number)

    @property
    def models_loaded(self) -> bool:
        return self.models is not None

    def manifest(self, job_id: str) -> JobManifest:
        """The job's manifest, read once per process (a few jobs kept)."""
        if job_id not in self._jobs:
            self._jobs[job_id] = (load_manifest(self.store, job_id), {})
        self._jobs.move_to_end(job_id)
        _bound(self._jobs, JOB_CACHE)
        return self._jobs[job_id][0]

    def items(self, manifest: JobManifest, chunk: int) -> list[Item]:
        """The units of ``chunk`` from the job's pages (each page read once per process)."""
        pages = self._jobs[manifest.job_id][1] if manifest.job_id in self._jobs else {}
        return chunk_items(pages, manifest, chunk, lambda page: load_page(self.store, manifest, page))

    def spec(self, manifest: JobManifest) -> SegmentSpec:
        return SegmentSpec.model_validate(manifest.spec)

    def count(self, units: int) -> None:
        """Add finished units to this worker's counter (its heartbeat reports the rate)."""
        if self.units is not None:
            with self.units.get_lock():
                self.units.value += units

    def engine(self, options: SegmentOptions, *, clip: str | None = None, points_per_batch: int | None = None):
        """The engine for a request over the warm models (``clip``: the job's ranker, default SLIP_CLIP's);
        its ``request`` is the resolved request (:func:`slip.request.resolve`). Assembled once per request."""
        self._require_models()
        return self.models.engine(options, clip=clip, points_per_batch=points_per_batch)

    def health(self) -> dict:
        """What is loaded (with the weights' digests and recommendations), where, and how much memory."""
        device = str(self.models.device) if self.models else None
        loaded = self.models.health() if self.models else {"engine": self.settings.models.engine, "sam": None,
                                                           "clip": None}
        return {
            "hostname": self.hostname, "pid": self.pid, "instance": self.instance,
            "models_loaded": self.models_loaded, **loaded,
            "device": device, "dtype": self.settings.models.dtype, "threads": _threads(),
            "load_seconds": round(self.load_seconds, 3), "memory": memory_report(device),
            "store": self.settings.store, "max_attempts": self.settings.max_attempts,
            "points_per_batch": self.settings.models.points_per_batch,
        }

    def close(self) -> None:
        self.board.r.close()

    def _require_models(self) -> None:
        if not self.models_loaded:
            raise ConfigError(f"worker {self.hostname} loaded no models: start it with -Q {MODEL_QUEUE}")


def load_resources(settings: Settings, *, load_models: bool, send: Send, instance: str = "",
                   units=None) -> WorkerResources:
    """Open the store and Redis, and (when ``load_models``) load the engine's models onto the device."""
    from slip.cli.common import SYNTH_SPEC, SYNTH_WARNING

    store = Store(settings.store)
    board = Board(connect(settings.broker_url))
    models, seconds = None, 0.0
    if load_models:
        from worker.models import load_warm_models

        models, seconds = load_warm_models(settings.models, store)
        if SYNTH_SPEC in (settings.models.sam, None if settings.models.engine == "sam3" else settings.models.clip):
            log.warning("%s", SYNTH_WARNING)
    return WorkerResources(settings=settings, store=store, board=board, send=send, models=models,
                           load_seconds=seconds, instance=instance, units=units,
                           sam=models.loaded.sam if models else None, ranker=models.loaded.ranker if models else None)


def set_threads(settings: Settings, concurrency: int) -> int:
    """Torch intra-op threads for one worker process: SLIP_THREADS, else this machine's cores shared among
    the ``concurrency`` pool processes (never fewer than one)."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = settings.models.threads or max(1, cores // max(1, concurrency))
    torch.set_num_threads(threads)
    return threads


def memory_report(device: str | None) -> dict:
    """Process RSS in bytes, and the accelerator's allocated / reserved bytes when on CUDA."""
    report: dict[str, int] = {"rss_bytes": _rss_bytes()}
    if device and device.startswith("cuda"):
        import torch

        report["cuda_allocated_bytes"] = int(torch.cuda.memory_allocated(device))
        report["cuda_reserved_bytes"] = int(torch.cuda.memory_reserved(device))
    return report


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # peak, Linux KiB


def _threads() -> int | None:
    import sys

    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None


def _bound(cache: OrderedDict, size: int) -> None:
    while len(cache) > size:
        cache.popitem(last=False)


class ResourceHolder:
    """The process's resources: created by :meth:`start` after the fork, read by tasks via :meth:`get`."""

    def __init__(self, settings: Settings, *, send: Send) -> None:
        self.settings = settings
        self.send = send
        self.main_pid: int | None = None  # pid of the worker's main process, set before any fork
        self.instance: str = uuid.uuid4().hex[:12]  # this worker's id; re-drawn at worker start, before any fork
        self.concurrency: int = 1  # pool processes of this worker, set at worker start
        self.cannot_start = None  # a shared flag (multiprocessing.Value) a pool process sets when its models fail
        self.ready = None  # a shared flag (multiprocessing.Value) the main process sets at worker_ready
        self.units = None  # a shared counter (multiprocessing.Value) of finished units, set at worker start
        self.worker = None  # the WorkController (main process): its exit code
        self.reaper = None  # the main process's reaper thread
        self._resources: WorkerResources | None = None

    def start(self, *, load_models: bool) -> WorkerResources:
        """Load everything in this process (idempotent within a process)."""
        if self._resources is None or self._resources.pid != os.getpid():
            models = self.settings.models
            log.info("loading SLIP resources (engine=%s sam=%s clip=%s device=%s dtype=%s)", models.engine, models.sam,
                     models.clip, models.device, models.dtype)
            self._resources = load_resources(self.settings, load_models=load_models, send=self.send,
                                             instance=self.instance, units=self.units)
            log.info("SLIP resources ready in %.1f s (models loaded: %s)", self._resources.load_seconds,
                     self._resources.models_loaded)
        return self._resources

    def get(self) -> WorkerResources:
        """The resources of this process; SlipError when the process was not initialised as a worker."""
        if self._resources is None or self._resources.pid != os.getpid():
            raise SlipError(
                "worker resources are not initialised in this process: tasks run only inside "
                "`celery -A worker worker`, which loads them at process start"
            )
        return self._resources

    def stop(self) -> None:
        if self._resources is not None and self._resources.pid == os.getpid():
            self._resources.close()
        self._resources = None
