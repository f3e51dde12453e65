"""The Celery application: ``celery -A worker worker -Q gpu,cpu`` and ``celery -A worker flower``.

Configuration (from :class:`worker.settings.Settings`, read once from the environment here, at the
edge): Redis broker and result backend; JSON only (pickle refused); late acks + reject on worker loss
+ prefetch 1, so a killed worker's task goes back to the queue and is delivered again; a visibility
timeout above the task time limit; soft/hard time limits; expiring results; task events for Flower;
two queues named for their hardware:

* ``gpu`` — model work (``slip.segment``, training tasks); its workers hold the models warm;
* ``cpu`` — light work (``slip.health``, ``slip.reconcile``); a worker consuming only ``cpu`` loads no
  models.

Each worker also has a direct queue (``worker_direct``) so a health check can reach one named worker.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal

from celery import Celery, signals
from kombu import Exchange, Queue

from slip.errors import SlipError
from worker.resources import MODEL_QUEUE, ResourceHolder
from worker.settings import Settings
from worker.store import Store

log = logging.getLogger("slip.worker")

TASK_MODULES = ("worker.tasks", "worker.train_tasks", "worker.train_sam_task")  # the last two: training
QUEUES = ("gpu", "cpu")
ROUTES = {
    "slip.segment": {"queue": "gpu"},
    "slip.train*": {"queue": "gpu"},
    "slip.health": {"queue": "cpu"},
    "slip.reconcile": {"queue": "cpu"},
}


def task_modules() -> list[str]:
    """Task modules that exist in this checkout (the training modules are optional)."""
    return [name for name in TASK_MODULES if importlib.util.find_spec(name) is not None]


def create_app(settings: Settings) -> Celery:
    """A Celery app configured from ``settings``; the holder of per-process resources hangs off it."""
    app = Celery("slip", broker=settings.broker_url, backend=settings.result_backend, include=task_modules())
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,  # ack after the task ran: a crash mid-task leaves the message queued
        task_reject_on_worker_lost=True,  # a killed pool process puts its task back on the queue
        worker_prefetch_multiplier=1,  # a worker reserves one message per process, no hoarding
        worker_concurrency=1,  # one pool process = one copy of the models per GPU (--concurrency overrides)
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            # look for messages of dead workers often, not once per 10 visibility timeouts
            "unacked_restore_throttle": 1,
            "unacked_restore_interval": max(1.0, settings.visibility_timeout_s / 4),
        },
        task_time_limit=settings.task_time_limit_s,
        task_soft_time_limit=settings.soft_time_limit_s,
        result_expires=settings.result_expires_s,
        worker_send_task_events=True,  # Flower
        task_send_sent_event=True,  # Flower sees queued tasks too
        task_track_started=True,  # STARTED state: `slip status` tells running from queued
        task_queues=tuple(Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES),
        task_default_queue=MODEL_QUEUE,
        task_routes=ROUTES,
        worker_direct=True,  # a queue per worker, for targeted health checks
        broker_connection_retry_on_startup=True,
        # on a broker blip let the running task finish: its result lands in the store, the unacked
        # message comes back after the visibility timeout and the rerun skips the finished images
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=True,
    )
    app.slip_settings = settings
    app.slip_resources = ResourceHolder(settings)
    return app


def consumes_model_queue(app: Celery) -> bool:
    """Whether this worker process consumes the ``gpu`` queue (and so needs the models)."""
    return MODEL_QUEUE in app.amqp.queues.consume_from


def connect_worker_signals(app: Celery) -> None:
    """Load resources after the fork in every pool process; release them when it ends."""
    holder: ResourceHolder = app.slip_resources

    @signals.worker_init.connect(weak=False)
    def _remember_main_pid(sender=None, **_):
        holder.main_pid = os.getpid()
        removed = Store(app.slip_settings.store).remove_stale_temporaries(app.slip_settings.task_time_limit_s)
        if removed:
            log.warning("removed %d temporary file(s) left by a killed writer", removed)

    @signals.worker_process_init.connect(weak=False)
    def _load(sender=None, **_):
        try:
            holder.start(load_models=consumes_model_queue(app))
        except SlipError as e:
            log.critical("error: this worker cannot start: %s", e)
            if holder.main_pid is not None and holder.main_pid != os.getpid():
                os.kill(holder.main_pid, signal.SIGTERM)  # stop the whole worker, not just this child
            raise SystemExit(1) from e

    @signals.worker_process_shutdown.connect(weak=False)
    def _release(sender=None, **_):
        holder.stop()


app = create_app(Settings.from_env(os.environ))
connect_worker_signals(app)
