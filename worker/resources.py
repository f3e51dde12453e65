"""Per-process worker resources: settings, store, Redis client and the warm SLIP models.

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
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import redis

from slip.errors import ConfigError, SlipError
from worker.jobs import SegmentParams
from worker.settings import Settings
from worker.store import Store

log = logging.getLogger("slip.worker")

PIPELINE_CACHE = 8  # distinct parameter sets kept as assembled pipelines per process
MODEL_QUEUE = "gpu"  # a worker that does not consume this queue loads no models


@dataclass
class WorkerResources:
    """What one worker process holds for its whole life."""

    settings: Settings
    store: Store
    redis: redis.Redis  # the broker's Redis: delivery counters for poison messages
    sam: Any | None  # segment_anything Sam, warm on settings.device; None on a cpu-only worker
    ranker: Any | None  # slip Ranker, warm; None on a cpu-only worker
    load_seconds: float  # time spent loading both models
    recommended_generator: dict = field(default_factory=dict)  # the SAM's generator.json options ({} if none)
    recommended_filters: str | None = None  # the SAM's filters.json chain (None if none)
    pid: int = field(default_factory=os.getpid)
    hostname: str = field(default_factory=socket.gethostname)
    _pipelines: OrderedDict = field(default_factory=OrderedDict)

    @property
    def models_loaded(self) -> bool:
        return self.sam is not None and self.ranker is not None

    def generator_options(self, params: SegmentParams) -> dict:
        """The resolved generator options of ``params`` on this worker's SAM (see
        :meth:`SegmentParams.generator_options`); they name the proposals in the cache."""
        return params.generator_options(self.recommended_generator)

    def filter_chain(self, params: SegmentParams) -> str:
        """The resolved filter chain of ``params`` on this worker's SAM (see :meth:`SegmentParams.filter_chain`);
        it names the proposals in the cache, with :meth:`generator_options`."""
        return params.filter_chain(self.recommended_filters)

    def pipeline(self, params: SegmentParams, *, points_per_batch: int | None = None):
        """A ``slip.SLIP`` for ``params`` over the warm models (assembling one costs no model load); the
        generator options are SAM's defaults < the SAM's generator.json < the options ``params`` gives, and
        the filter chain is ``containment`` < the SAM's filters.json < the chain ``params`` gives."""
        from slip.crops import CropConfig
        from slip.filters import parse_filters
        from slip.generator import MaskGenerator
        from slip.pipeline import SLIP

        if not self.models_loaded:
            raise ConfigError(f"worker {self.hostname} loaded no models: start it with -Q {MODEL_QUEUE}")
        ppb = points_per_batch or self.settings.points_per_batch
        key = (params.model_dump_json(), ppb)
        if key not in self._pipelines:
            self._pipelines[key] = SLIP(
                MaskGenerator(self.sam, points_per_batch=ppb, **self.generator_options(params)),
                self.ranker,
                filters=parse_filters(self.filter_chain(params)),
                crop=CropConfig(background=params.crop_background, padding=params.crop_padding, square=params.square),
                top_k=params.top_k,
                threshold=params.threshold,
                one_to_one=params.one_to_one,
                batch_size=self.settings.batch_size,
            )
        self._pipelines.move_to_end(key)
        while len(self._pipelines) > PIPELINE_CACHE:
            self._pipelines.popitem(last=False)
        return self._pipelines[key]

    def health(self) -> dict:
        """What is loaded, where, and how much memory it takes."""
        device = str(self.ranker.device) if self.ranker is not None else None
        return {
            "hostname": self.hostname,
            "pid": self.pid,
            "models_loaded": self.models_loaded,
            "sam": self.settings.sam if self.sam is not None else None,
            "clip": self.settings.clip if self.ranker is not None else None,
            "device": device,
            "dtype": self.settings.dtype,
            "load_seconds": round(self.load_seconds, 3),
            "memory": memory_report(device),
            "store": self.settings.store,
            "max_deliveries": self.settings.max_deliveries,
            "points_per_batch": self.settings.points_per_batch,
            "recommended_generator": self.recommended_generator,
            "recommended_filters": self.recommended_filters,
        }

    def close(self) -> None:
        self.redis.close()


def load_resources(settings: Settings, *, load_models: bool) -> WorkerResources:
    """Open the store and Redis, and (when ``load_models``) load SAM, its recommended generator options
    and filter chain, and the ranker onto the device."""
    store = Store(settings.store)
    client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=5, socket_timeout=30)
    sam = ranker = None
    recommended: dict = {}
    filters: str | None = None
    start = time.perf_counter()
    if load_models:
        from slip.rankers.loading import load_ranker
        from slip.sam import load_sam, recommended_filters, recommended_generator_params

        common = {"device": settings.device, "dtype": settings.dtype, "cache_dir": settings.cache_dir}
        sam = load_sam(settings.sam, **common)
        recommended = recommended_generator_params(settings.sam, cache_dir=settings.cache_dir)
        filters = recommended_filters(settings.sam, cache_dir=settings.cache_dir)
        ranker = load_ranker(settings.clip, **common)
    return WorkerResources(
        settings=settings, store=store, redis=client, sam=sam, ranker=ranker,
        load_seconds=time.perf_counter() - start, recommended_generator=recommended, recommended_filters=filters,
    )


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


class ResourceHolder:
    """The process's resources: created by :meth:`start` after the fork, read by tasks via :meth:`get`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.main_pid: int | None = None  # pid of the worker's main process, set before any fork
        self._resources: WorkerResources | None = None

    def start(self, *, load_models: bool) -> WorkerResources:
        """Load everything in this process (idempotent within a process)."""
        if self._resources is None or self._resources.pid != os.getpid():
            log.info("loading SLIP resources (sam=%s clip=%s device=%s)", self.settings.sam, self.settings.clip, self.settings.device)
            self._resources = load_resources(self.settings, load_models=load_models)
            log.info("SLIP resources ready in %.1f s (models loaded: %s)", self._resources.load_seconds, self._resources.models_loaded)
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
