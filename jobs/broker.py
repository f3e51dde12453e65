"""The queue's Celery side, through Celery's and kombu's public API only: the configured app (JSON only, late
acks, reject on worker loss, prefetch 1; queues ``gpu`` for every job's chunks and ``cpu`` for health), one
message ``(job, chunk, attempt)`` per send — a chunk sent again goes ahead of every first send
(``send_task(priority=...)``: kombu's Redis transport serves lower numbers first) — and queue depths.
"""

from __future__ import annotations

from typing import Callable

from celery import Celery
from kombu import Exchange, Queue
from kombu.exceptions import ChannelError, OperationalError
from kombu.utils.url import maybe_sanitize_url

from jobs.errors import REDIS_ERRORS, BrokerError
from jobs.settings import Settings

MODEL_QUEUE = "gpu"  # model work: every job's chunks
LIGHT_QUEUE = "cpu"  # light work (health); a worker consuming only this loads no models
FIRST_SEND, SENT_AGAIN = 6, 0  # message priorities: a chunk sent again is served before first sends
TASKS = {"segment": "slip.segment", "train": "slip.train", "evaluate": "slip.evaluate", "train-sam": "slip.train_sam"}
SEND_RETRY = {"max_retries": 20, "interval_start": 0.5, "interval_step": 1.0, "interval_max": 4.0}  # ~60 s
Send = Callable[..., None]  # send(kind, job, chunk, attempt, *, again)


def celery_app(settings: Settings) -> Celery:
    """A configured Celery app that sends by task name and runs nothing (workers register the tasks)."""
    app = Celery("slip", broker=settings.broker_url, backend=settings.result_backend, set_as_current=False)
    app.conf.update(
        task_serializer="json", result_serializer="json", accept_content=["json"], result_accept_content=["json"],
        task_acks_late=True,  # ack after the task ran: a crash mid-task leaves the message queued
        task_reject_on_worker_lost=True,  # a killed pool process puts its message back on the queue
        worker_prefetch_multiplier=1,  # a worker reserves one message per process, no hoarding
        worker_concurrency=1,  # one pool process = one copy of the models per GPU (--concurrency overrides)
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a worker waits for Redis as long as it takes
        result_backend_always_retry=True,  # task states survive a Redis restart
        result_backend_max_retries=30,
        task_time_limit=settings.task_time_limit_s,
        task_soft_time_limit=settings.soft_time_limit_s,
        result_expires=settings.result_expires_s,
        worker_send_task_events=True,  # Flower
        task_send_sent_event=True,  # Flower sees queued tasks too
        task_track_started=True,
        task_queues=tuple(Queue(name, Exchange(name, type="direct"), routing_key=name)
                          for name in (MODEL_QUEUE, LIGHT_QUEUE)),
        task_default_queue=MODEL_QUEUE,
        task_routes={**{name: {"queue": MODEL_QUEUE} for name in TASKS.values()}, "slip.health": {"queue": LIGHT_QUEUE}},
        worker_direct=True,  # a queue per worker, for targeted health checks
        # on a broker blip let the running task finish: its result lands in the store and is recorded
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=True,
    )
    return app


def task_id(job_id: str, chunk: int, attempt: int) -> str:
    """The message id of ``attempt`` of ``chunk`` (readable in Flower; the result backend keys progress by it)."""
    return f"{job_id}.{chunk}.{attempt}"


def sender(app: Celery) -> Send:
    """``send(kind, job, chunk, attempt, again=...)``: one message on the model queue, ridden through broker
    blips (about a minute); BrokerError when Redis stays away."""

    def send(kind: str, job_id: str, chunk: int, attempt: int, *, again: bool) -> None:
        try:
            app.send_task(TASKS[kind], kwargs={"job": job_id, "chunk": chunk, "attempt": attempt},
                          task_id=task_id(job_id, chunk, attempt), queue=MODEL_QUEUE,
                          priority=SENT_AGAIN if again else FIRST_SEND, retry=True, retry_policy=SEND_RETRY)
        except (OperationalError, *REDIS_ERRORS) as e:
            raise BrokerError(f"cannot reach Redis at {maybe_sanitize_url(app.conf.broker_url)} to send job {job_id} "
                              f"chunk {chunk}: {e}; the workers send it again once Redis is back") from e

    return send


def queue_depths(app: Celery, queues: tuple[str, ...] = (MODEL_QUEUE, LIGHT_QUEUE)) -> dict[str, int]:
    """Messages waiting in each queue (kombu's ``queue_declare(passive=True)``; a queue never used counts 0)."""
    depths = {}
    with app.connection_for_read() as connection:
        channel = connection.default_channel
        for name in queues:
            try:
                depths[name] = Queue(name, channel=channel).queue_declare(passive=True).message_count
            except ChannelError:
                depths[name] = 0
    return depths
