"""Per-process worker resources: settings, store, Redis, the feeder and the warm SLIP models.

Models are loaded ONCE per worker process, in the process that uses them: the Celery signal
``worker_process_init`` fires in each prefork child after the fork (and once in a ``-P solo`` worker),
never in the parent that forks (CUDA cannot survive a fork). Tasks never load models; they ask the
app's :class:`ResourceHolder` for the process's :class:`WorkerResources`.

The holder is the one piece of per-process mutable state, and it hangs off the Celery app object
(``app.slip_resources``), not off a module global.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from slip.errors import ConfigError, SlipError
from worker.board import JobBoard, connect
from worker.broker import MODEL_QUEUE, holdings
from worker.feeder import Feeder, Publish
from worker.jobs import SegmentParams
from worker.settings import Settings
from worker.store import Store, canonical_json

log = logging.getLogger("slip.worker")

PIPELINE_CACHE = 8  # distinct requests kept as assembled pipelines per process


@dataclass
class WorkerResources:
    """What one worker process holds for its whole life."""

    settings: Settings
    store: Store
    board: JobBoard  # the cluster's job state in Redis (the broker's Redis)
    feeder: Feeder  # tops jobs up after a chunk finishes
    sam: Any | None  # slip.sam.SamBundle, warm on settings.device; None on a cpu-only worker
    ranker: Any | None  # slip.rankers.loading.RankerBundle, warm; None on a cpu-only worker
    load_seconds: float  # time spent loading both models
    instance: str = ""  # this worker's id (its main process), named in heartbeats and running chunks
    pid: int = field(default_factory=os.getpid)
    hostname: str = field(default_factory=socket.gethostname)
    _requests: OrderedDict = field(default_factory=OrderedDict)
    _pipelines: OrderedDict = field(default_factory=OrderedDict)

    @property
    def models_loaded(self) -> bool:
        return self.sam is not None and self.ranker is not None

    def serves(self, sam: str, clip: str) -> bool:
        return self.settings.sam == sam and self.settings.clip == clip

    def resolve(self, params: SegmentParams):
        """The request ``params`` resolved against this worker's models (:func:`slip.request.resolve`)."""
        from slip.request import resolve

        self._require_models()
        key = params.model_dump_json()
        if key not in self._requests:
            self._requests[key] = resolve(
                params.to_options(), sam=self.sam.ref, sam_generator=self.sam.generator, sam_filters=self.sam.filters,
                ranker=self.ranker.ref, ranker_threshold=self.ranker.threshold, dtype=self.settings.dtype)
        _bound(self._requests)
        return self._requests[key]

    def pipeline(self, request, *, points_per_batch: int | None = None):
        """A ``slip.SLIP`` for a resolved request over the warm models (assembling one loads nothing)."""
        from slip.pipeline import SLIP

        self._require_models()
        ppb = points_per_batch or self.settings.points_per_batch
        key = (canonical_json(request.to_json()), ppb)
        if key not in self._pipelines:
            self._pipelines[key] = SLIP.build(self.sam.model, self.ranker.ranker, request, points_per_batch=ppb,
                                              batch_size=self.settings.batch_size)
        _bound(self._pipelines)
        return self._pipelines[key]

    def health(self) -> dict:
        """What is loaded (with the weights' digests and recommendations), where, and how much memory."""
        device = str(self.ranker.ranker.device) if self.ranker is not None else None
        return {
            "hostname": self.hostname,
            "pid": self.pid,
            "instance": self.instance,
            "models_loaded": self.models_loaded,
            "sam": self.sam.ref.to_json() if self.sam is not None else None,
            "clip": self.ranker.ref.to_json() if self.ranker is not None else None,
            "device": device,
            "dtype": self.settings.dtype,
            "threads": _threads(),
            "load_seconds": round(self.load_seconds, 3),
            "memory": memory_report(device),
            "store": self.settings.store,
            "max_deliveries": self.settings.max_deliveries,
            "points_per_batch": self.settings.points_per_batch,
            "recommended_generator": dict(self.sam.generator) if self.sam is not None else None,
            "recommended_filters": self.sam.filters if self.sam is not None else None,
            "recommended_threshold": self.ranker.threshold if self.ranker is not None else None,
        }

    def close(self) -> None:
        self.board.r.close()

    def _require_models(self) -> None:
        if not self.models_loaded:
            raise ConfigError(f"worker {self.hostname} loaded no models: start it with -Q {MODEL_QUEUE}")


def load_resources(settings: Settings, *, load_models: bool, publish: Publish, instance: str = "") -> WorkerResources:
    """Open the store and Redis, and (when ``load_models``) load SAM and the ranker onto the device."""
    from slip.cli.common import SYNTH_SPEC, SYNTH_WARNING

    store = Store(settings.store)
    board = JobBoard(connect(settings.broker_url))
    feeder = Feeder(board=board, store=store, publish=publish, settings=settings,
                    broker=lambda: holdings(board.r, (MODEL_QUEUE,)))
    sam = ranker = None
    start = time.perf_counter()
    if load_models:
        from slip.rankers.loading import load_ranker_bundle
        from slip.sam import load_sam_bundle

        sam = load_sam_bundle(settings.sam, device=settings.device, cache_dir=settings.cache_dir)
        ranker = load_ranker_bundle(settings.clip, device=settings.device, dtype=settings.dtype,
                                    cache_dir=settings.cache_dir)
        if SYNTH_SPEC in (settings.sam, settings.clip):
            log.warning("%s", SYNTH_WARNING)
    return WorkerResources(settings=settings, store=store, board=board, feeder=feeder, sam=sam, ranker=ranker,
                           load_seconds=time.perf_counter() - start, instance=instance)


def set_threads(settings: Settings, concurrency: int) -> int:
    """Torch intra-op threads for one worker process: SLIP_THREADS, else this machine's cores shared among
    the ``concurrency`` pool processes (never fewer than one)."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = settings.threads or max(1, cores // max(1, concurrency))
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


def _bound(cache: OrderedDict) -> None:
    while len(cache) > PIPELINE_CACHE:
        cache.popitem(last=False)


class ResourceHolder:
    """The process's resources: created by :meth:`start` after the fork, read by tasks via :meth:`get`."""

    def __init__(self, settings: Settings, *, publish: Publish) -> None:
        self.settings = settings
        self.publish = publish
        self.main_pid: int | None = None  # pid of the worker's main process, set before any fork
        self.instance: str = uuid.uuid4().hex[:12]  # this worker's id; re-drawn at worker start, before any fork
        self.concurrency: int = 1  # pool processes of this worker, set at worker start
        self.cannot_start = None  # a shared flag (multiprocessing.Value) a pool process sets when its models fail
        self._resources: WorkerResources | None = None

    def start(self, *, load_models: bool) -> WorkerResources:
        """Load everything in this process (idempotent within a process)."""
        if self._resources is None or self._resources.pid != os.getpid():
            log.info("loading SLIP resources (sam=%s clip=%s device=%s dtype=%s)", self.settings.sam,
                     self.settings.clip, self.settings.device, self.settings.dtype)
            self._resources = load_resources(self.settings, load_models=load_models, publish=self.publish,
                                             instance=self.instance)
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

