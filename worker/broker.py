"""Which task messages the broker holds: the only module that reads kombu's Redis transport layout.

kombu keeps a queue as Redis lists, one per priority step: the queue's name (``gpu``) for step 0, then
``gpu\x06\x163`` and so on; a worker pops the lists in step order, so a lower step is served first. Each
element is a JSON message whose ``headers.id`` is the Celery task id; a message handed to a worker and
not yet acknowledged sits in the hash ``unacked`` (delivery tag -> ``[message, exchange, routing key]``)
with its delivery time in the sorted set ``unacked_index``. A message that is in neither is lost (a Redis
restart that dropped the last writes, a publish that failed half-way); one that sits in ``unacked`` while
no worker reports running it belongs to a worker that died before starting it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import redis

MODEL_QUEUE = "gpu"  # model work (segment, training); its workers hold the models warm
LIGHT_QUEUE = "cpu"  # light work (health, feed); a worker consuming only this loads no models
PRIORITY_STEPS = (0, 3, 6, 9)  # kombu's Redis priority lists (broker_transport_options pins them); 0 first
PRIORITY_SEP = "\x06\x16"  # kombu's separator between a queue's name and its priority step
FIRST_SEND = 3  # priority of a chunk's first send
SENT_AGAIN = 0  # a chunk sent again (its worker died, its message vanished): served before first sends
UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"


@dataclass(frozen=True)
class Holdings:
    """Task ids the broker holds, and since when for the handed-out ones."""

    queued: frozenset[str]  # waiting in the queue list
    unacked: dict[str, float]  # handed to a worker, not acknowledged: task id -> delivery time (epoch s)

    def holds(self, task_id: str) -> bool:
        return task_id in self.queued or task_id in self.unacked


def queue_lists(queue: str) -> tuple[str, ...]:
    """The Redis lists that hold ``queue``'s messages, in the order workers serve them."""
    return tuple(queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}" for step in PRIORITY_STEPS)


def holdings(client: redis.Redis, queues: tuple[str, ...]) -> Holdings:
    """The task ids in ``queues`` and in the unacked hash (two round trips; bounded by the in-flight
    windows of the running jobs, since producers never flood the queue)."""
    pipe = client.pipeline()
    for queue in queues:
        for name in queue_lists(queue):
            pipe.lrange(name, 0, -1)
    pipe.hgetall(UNACKED)
    pipe.zrange(UNACKED_INDEX, 0, -1, withscores=True)
    *lists, unacked, index = pipe.execute()
    queued = frozenset(filter(None, (_task_id(raw) for items in lists for raw in items)))
    since = {tag.decode() if isinstance(tag, bytes) else tag: score for tag, score in index}
    handed = {}
    for tag, raw in unacked.items():
        task = _task_id(raw, wrapped=True)
        if task:
            handed[task] = since.get(tag.decode() if isinstance(tag, bytes) else tag, 0.0)
    return Holdings(queued=queued, unacked=handed)


def _task_id(raw: bytes, *, wrapped: bool = False) -> str | None:
    """The Celery task id of a stored kombu message (``wrapped``: the unacked ``[message, ...]`` form)."""
    try:
        data = json.loads(raw)
        message = data[0] if wrapped else data
        return message["headers"]["id"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None  # not a Celery protocol-2 message: not ours
