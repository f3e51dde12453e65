"""The worker's Celery application: :func:`create_app` builds one from typed settings.

Nothing here runs at import time. ``celery -A worker worker -Q gpu,cpu`` and ``celery -A worker flower``
find the app in :mod:`worker.celery`, the one module that reads the environment (at process start). The
configuration is the queue's (:func:`jobs.broker.celery_app`); a worker app adds the tasks
(:mod:`worker.tasks`), its resources and the worker signals, each connected once per process whatever the
number of apps (``dispatch_uid``; a handler finds its app through the signal's sender or, in a pool process,
Celery's current app):

* ``worker_init`` (main process, before the fork): the log level (``SLIP_LOG_LEVEL``), the device check (a
  worker that cannot start says one line and exits 1), the shared counters, model code imported once;
* ``worker_ready`` / ``worker_shutdown``: the reaper thread (:mod:`jobs.reaper`) starts and stops;
* ``worker_process_init`` / ``worker_process_shutdown`` (each pool process): models loaded, then released.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import signal
import time

from celery import Celery, current_app, signals

from jobs.board import Board, connect
from jobs.broker import MODEL_QUEUE, celery_app, queue_depths, sender
from jobs.reaper import Reaper
from jobs.settings import Settings
from jobs.store import Store
from slip.errors import SlipError
from worker.resources import ResourceHolder, set_threads
from worker.tasks import run

log = logging.getLogger("slip.worker")

EXIT_CANNOT_START = 1  # exit code of a worker whose models cannot load
PROCESS_START_S = 600.0  # a pool process may take this long to load its models before it counts as failed


def create_app(settings: Settings, *, worker: bool = False) -> Celery:
    """A Celery app configured from ``settings``. A client app sends tasks by name and holds nothing; a
    ``worker`` app registers the tasks, holds the process's resources and answers the worker signals."""
    app = celery_app(settings)
    if worker:
        # a pool process reports "up" only after worker_process_init has loaded the models: a vit_h load takes
        # far more than Celery's default 4 s, and a replacement for a killed process would be killed forever
        app.conf.worker_proc_alive_timeout = PROCESS_START_S
        app.slip_resources = ResourceHolder(settings, send=sender(app))
        register(app)
        for handler in (_worker_init, _worker_ready, _exit_code, _worker_shutdown, _process_init, _process_shutdown):
            handler.signal.connect(handler, weak=False, dispatch_uid=f"slip.worker.{handler.__name__}")
    return app


def register(app: Celery) -> None:
    """The tasks: the chunk runner under one name per job kind (Flower tells them apart; the training kinds
    keep results, for their per-epoch progress), and the health check."""
    for name, keep in (("slip.segment", False), ("slip.train", True), ("slip.evaluate", True), ("slip.train_sam", True)):
        app.task(name=name, bind=True, ignore_result=not keep)(run)
    app.task(name="slip.health", bind=True)(health)


def health(task) -> dict:
    """What this worker process has loaded (specs, digests, device, dtype, memory), its pid and host."""
    report = task.app.slip_resources.get().health()
    report["queues"] = sorted(task.app.amqp.queues.consume_from)
    report["worker"] = task.request.hostname
    return report


def consumes_model_queue(app: Celery) -> bool:
    """Whether this worker process consumes the ``gpu`` queue (and so needs the models)."""
    return MODEL_QUEUE in app.amqp.queues.consume_from


def _holder(app) -> ResourceHolder | None:
    return getattr(app, "slip_resources", None)


def _worker_init(sender=None, **_) -> None:
    """Main process, before the fork: log level, device check, shared counters, model code imported."""
    holder = _holder(sender.app)
    if holder is None:
        return
    logging.getLogger("slip").setLevel(holder.settings.models.log_level)
    holder.main_pid, holder.worker = os.getpid(), sender
    holder.cannot_start = multiprocessing.Value("b", 0, lock=False)  # shared with the pool processes
    holder.ready = multiprocessing.Value("b", 0, lock=False)  # set once the main process's consumer is up
    holder.units = multiprocessing.Value("q", 0)
    holder.concurrency = int(getattr(sender, "concurrency", None) or sender.app.conf.worker_concurrency or 1)
    if consumes_model_queue(sender.app):
        problem = device_problem(holder.settings.models.device)
        if problem:
            os.write(2, f"error: this worker cannot start: {problem}\n".encode())
            os._exit(EXIT_CANNOT_START)  # before any fork: nothing to clean up
        _preimport_model_code()
        _quiet_model_loading()


def _worker_ready(sender=None, **_) -> None:
    """Main process: the reaper thread (heartbeat, dead holders, top-ups, lost messages, temporaries)."""
    app = sender.app
    holder = _holder(app)
    if holder is None:
        return
    if holder.ready is not None:
        holder.ready.value = 1
    settings = holder.settings
    holder.reaper = Reaper(board=Board(connect(settings.broker_url)), store=Store(settings.store), settings=settings,
                           send=holder.send, queue_empty=lambda: queue_depths(app, (MODEL_QUEUE,))[MODEL_QUEUE] == 0,
                           instance=holder.instance, node=getattr(sender, "hostname", None) or "worker",
                           units=lambda: holder.units.value if holder.units is not None else 0,
                           serves=serves(settings.models) if consumes_model_queue(app) else None)
    holder.reaper.start()


def serves(models) -> dict:
    """What a worker loading ``models`` (ModelSettings) serves, as its heartbeat says (``slip compare --queue``
    and ``QueueClient.workers`` read it): the engine and its SAM, and the ranker it keeps warm."""
    return {"engine": models.engine, "sam": models.sam, "clip": None if models.engine == "sam3" else models.clip}


def _exit_code(sender=None, **_) -> None:
    """Main process, on a shutdown signal: exit 1 when a pool process could not load the models."""
    holder = _holder(current_app)
    if holder is not None and holder.cannot_start is not None and holder.cannot_start.value and holder.worker:
        holder.worker.exitcode = EXIT_CANNOT_START


def _worker_shutdown(sender=None, **_) -> None:
    holder = _holder(current_app)
    if holder is not None and holder.reaper is not None:
        holder.reaper.stop()


def _process_init(**_) -> None:
    """Each pool process, after the fork: torch threads, then the resources (models on the gpu queue)."""
    app = current_app
    holder = _holder(app)
    if holder is None:
        return
    try:
        threads = set_threads(holder.settings, holder.concurrency)
        log.info("torch intra-op threads: %d (SLIP_THREADS, else cores / concurrency %d)", threads, holder.concurrency)
        holder.start(load_models=consumes_model_queue(app))
    except SlipError as e:
        _exit_cannot_start(holder, e)


def _process_shutdown(**_) -> None:
    holder = _holder(current_app)
    if holder is not None:
        holder.stop()


_worker_init.signal = signals.worker_init
_worker_ready.signal = signals.worker_ready
_exit_code.signal = signals.worker_shutting_down
_worker_shutdown.signal = signals.worker_shutdown
_process_init.signal = signals.worker_process_init
_process_shutdown.signal = signals.worker_process_shutdown


def device_problem(device: str) -> str | None:
    """Why ``SLIP_DEVICE`` cannot be used on this machine, or None (checked without initialising CUDA)."""
    if not device.startswith("cuda"):
        return None
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # count GPUs through NVML: fork-safe
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.partition(":")[2] or 0)
    if index < count:
        return None
    seen = f"{count} CUDA GPU(s)" if count else "no CUDA GPU"
    return (f"SLIP_DEVICE={device}, but this machine has {seen} (torch {torch.__version__}, CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): set SLIP_DEVICE=cpu or SLIP_DEVICE=auto")


def _preimport_model_code() -> None:
    """Import torch and the model libraries once, in the main process, before it forks: a pool process
    (and the replacement of a killed one) then starts in about a second instead of importing them anew.
    Nothing touches CUDA here (it initialises on first use, in the pool process)."""
    for name in ("torch", "segment_anything", "transformers", "slip.pipeline", "slip.proposers.loading",
                 "slip.rankers.loading", "slip.engines.build", "worker.processing"):
        importlib.import_module(name)


def _quiet_model_loading() -> None:
    """No weight-loading progress bars in the worker's log: transformers draws one per model load (a ranker loaded
    on demand included), which Celery's log shows as WARNING lines. Its public switch, set before the fork."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _wait_main_ready(holder: ResourceHolder, timeout_s: float = 60.0) -> None:
    """Wait until the main process's consumer is up (``worker_ready``), then a moment more: a cold shutdown that
    arrives while Celery is still starting its consumer tears the pool down under it, and Celery then fails
    with a traceback (``'NoneType' object has no attribute 'did_start_ok'``) instead of exiting quietly."""
    deadline = time.monotonic() + timeout_s
    while holder.ready is not None and not holder.ready.value and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # worker_ready is sent just before the consumer's event loop starts


def _exit_cannot_start(holder: ResourceHolder, e: SlipError) -> None:
    """One line on stderr, then the whole worker stops with exit code 1: it never serves without models."""
    os.write(2, f"error: this worker cannot start: {e}\n".encode())  # fd 2 itself: Celery proxies sys.stderr
    if holder.main_pid is not None and holder.main_pid != os.getpid():
        if holder.cannot_start is not None:
            holder.cannot_start.value = 1  # read by the main process's worker_shutting_down handler
        _wait_main_ready(holder)
        os.kill(holder.main_pid, signal.SIGQUIT)  # cold shutdown of the main process
    os._exit(EXIT_CANNOT_START)
