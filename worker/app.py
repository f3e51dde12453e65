"""The Celery application factory: :func:`create_app` builds a configured app from typed settings.

Nothing here runs at import time. ``celery -A worker worker -Q gpu,cpu`` and ``celery -A worker flower``
find the app in :mod:`worker.celery`, the one module that reads the environment (at process start).

Configuration: Redis broker and result backend; JSON only (pickle refused); late acks + reject on worker
loss + prefetch 1, so a killed pool process's task goes back to the queue and is delivered again; a
visibility timeout above the task time limit (the backstop: a killed worker's chunk is sent again within
``SLIP_DEAD_AFTER`` seconds by the feeder, long before); soft/hard time limits; task events for Flower;
two queues named for their hardware:

* ``gpu`` — model work (``slip.segment``, training tasks); its workers hold the models warm;
* ``cpu`` — light work (``slip.health``, ``slip.feed``); a worker consuming only ``cpu`` loads no models.

Each worker also has a direct queue (``worker_direct``) so a health check can reach one named worker.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import signal

from celery import Celery, signals
from kombu import Exchange, Queue

from slip.errors import SlipError
from worker.broker import LIGHT_QUEUE, MODEL_QUEUE, PRIORITY_SEP, PRIORITY_STEPS
from worker.resources import ResourceHolder, set_threads
from worker.settings import Settings

log = logging.getLogger("slip.worker")

TASK_MODULES = ("worker.tasks", "worker.train_tasks", "worker.train_sam_task")  # each has register(app)
QUEUES = (MODEL_QUEUE, LIGHT_QUEUE)
EXIT_CANNOT_START = 1  # exit code of a worker whose models cannot load
PROCESS_START_S = 600.0  # a pool process may take this long to load its models before it counts as failed
ROUTES = {
    "slip.segment": {"queue": "gpu"},
    "slip.train*": {"queue": "gpu"},
    "slip.evaluate": {"queue": "gpu"},
    "slip.health": {"queue": "cpu"},
    "slip.feed": {"queue": "cpu"},
}


def create_app(settings: Settings, *, worker: bool = False) -> Celery:
    """A Celery app configured from ``settings``. A client (producer) app sends tasks by name and imports no
    task code; ``worker`` registers the tasks and connects the worker-process signals (model loading after
    the fork, the ticker, a clean exit when models cannot load)."""
    from worker.feeder import publisher

    app = Celery("slip", broker=settings.broker_url, backend=settings.result_backend, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,  # ack after the task ran: a crash mid-task leaves the message queued
        task_reject_on_worker_lost=True,  # a killed pool process puts its task back on the queue
        worker_prefetch_multiplier=1,  # a worker reserves one message per process, no hoarding
        worker_concurrency=1,  # one pool process = one copy of the models per GPU (--concurrency overrides)
        # a pool process reports "up" only after worker_process_init has loaded the models: a vit_h load (and
        # the first hash of its 2.5 GB) takes far more than Celery's default 4 s, and a replacement for a
        # killed process would otherwise be killed and replaced again, forever
        worker_proc_alive_timeout=PROCESS_START_S,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_throttle": 1,
            "unacked_restore_interval": max(1.0, settings.visibility_timeout_s / 4),
            "priority_steps": list(PRIORITY_STEPS),  # the layout worker.broker reads
            "sep": PRIORITY_SEP,
        },
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a worker waits for Redis as long as it takes
        result_backend_always_retry=True,  # task states survive a Redis restart
        result_backend_max_retries=30,
        task_time_limit=settings.task_time_limit_s,
        task_soft_time_limit=settings.soft_time_limit_s,
        result_expires=settings.result_expires_s,
        worker_send_task_events=True,  # Flower
        task_send_sent_event=True,  # Flower sees queued tasks too
        task_track_started=True,  # STARTED state for the training tasks' progress
        task_queues=tuple(Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES),
        task_default_queue=MODEL_QUEUE,
        task_routes=ROUTES,
        worker_direct=True,  # a queue per worker, for targeted health checks
        # on a broker blip let the running task finish: its result lands in the store and is recorded
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=True,
    )
    app.slip_settings = settings
    app.slip_resources = ResourceHolder(settings, publish=publisher(app))
    if worker:
        for name in TASK_MODULES:
            importlib.import_module(name).register(app)
        connect_worker_signals(app)
    return app


def consumes_model_queue(app: Celery) -> bool:
    """Whether this worker process consumes the ``gpu`` queue (and so needs the models)."""
    return MODEL_QUEUE in app.amqp.queues.consume_from


def connect_worker_signals(app: Celery) -> None:
    """Load resources after the fork in every pool process; the ticker in the main process; release at exit."""
    holder: ResourceHolder = app.slip_resources
    state: dict = {}

    @signals.worker_init.connect(weak=False)
    def _remember_main(sender=None, **_):
        holder.main_pid = os.getpid()
        holder.cannot_start = multiprocessing.Value("b", 0, lock=False)  # shared with the pool processes
        state["worker"] = sender  # its exitcode is what `celery worker` exits with
        holder.concurrency = int(getattr(sender, "concurrency", None) or app.conf.worker_concurrency or 1)
        store = holder.settings.store
        if "://" not in store or store.startswith("file://"):
            _sweep_temporaries(holder)
        if consumes_model_queue(app):
            _preimport_model_code()

    @signals.worker_ready.connect(weak=False)
    def _start_ticker(sender=None, **_):
        from worker.board import JobBoard, connect
        from worker.broker import holdings
        from worker.feeder import Feeder
        from worker.heartbeat import Ticker
        from worker.store import Store

        board = JobBoard(connect(holder.settings.broker_url))
        feeder = Feeder(board=board, store=Store(holder.settings.store), publish=holder.publish,
                        settings=holder.settings, broker=lambda: holdings(board.r, (MODEL_QUEUE,)))
        node = getattr(sender, "hostname", None) or "worker"
        state["ticker"] = Ticker(board=board, feeder=feeder, settings=holder.settings, instance=holder.instance,
                                 node=node)
        state["ticker"].start()

    @signals.worker_shutting_down.connect(weak=False)
    def _exit_code(sender=None, **_):  # in the main process, when a shutdown signal arrives
        if holder.cannot_start is not None and holder.cannot_start.value and state.get("worker") is not None:
            state["worker"].exitcode = EXIT_CANNOT_START

    @signals.worker_shutdown.connect(weak=False)
    def _stop_ticker(sender=None, **_):
        if "ticker" in state:
            state["ticker"].stop()

    @signals.worker_process_init.connect(weak=False)
    def _load(sender=None, **_):
        try:
            threads = set_threads(holder.settings, holder.concurrency)
            log.info("torch intra-op threads: %d (SLIP_THREADS, else cores / concurrency %d)", threads, holder.concurrency)
            holder.start(load_models=consumes_model_queue(app))
        except SlipError as e:
            _exit_cannot_start(holder, e)

    @signals.worker_process_shutdown.connect(weak=False)
    def _release(sender=None, **_):
        holder.stop()


def _preimport_model_code() -> None:
    """Import torch and the model libraries once, in the main process, before it forks: a pool process
    (and the replacement of a killed one) then starts in about a second instead of importing them anew.
    Nothing touches CUDA here (it initialises on first use, in the pool process)."""
    for name in ("torch", "segment_anything", "transformers", "slip.pipeline", "slip.sam", "slip.rankers.loading",
                 "worker.processing"):
        importlib.import_module(name)


def _sweep_temporaries(holder: ResourceHolder) -> None:
    """Remove temporary files a killed writer left in a directory store (object stores have none)."""
    from worker.store import Store

    removed = Store(holder.settings.store).remove_stale_temporaries(holder.settings.task_time_limit_s)
    if removed:
        log.warning("removed %d temporary file(s) left by a killed writer", removed)


def _exit_cannot_start(holder: ResourceHolder, e: SlipError) -> None:
    """One line on stderr, then the whole worker stops with exit code 1: it never serves without models."""
    os.write(2, f"error: this worker cannot start: {e}\n".encode())  # fd 2 itself: Celery proxies sys.stderr
    if holder.main_pid is not None and holder.main_pid != os.getpid():
        if holder.cannot_start is not None:
            holder.cannot_start.value = 1  # read by the main process's worker_shutdown handler
        os.kill(holder.main_pid, signal.SIGQUIT)  # cold shutdown of the main process
    os._exit(EXIT_CANNOT_START)
