"""The cluster's view of its jobs, in Redis: what is sent, running, finished, and who is alive.

Every Redis key the queue writes (besides Celery's own) is named here::

    slip:jobs                    SET   ids of the jobs the cluster is feeding
    slip:job:<id>                HASH  chunks, window, next (first chunk never sent), state, created
    slip:job:<id>:sent           HASH  chunk -> {"task", "at", "attempt"}: sent, not finished
    slip:job:<id>:running        HASH  chunk -> {"task", "worker", "node", "at"}: a worker holds it now
    slip:job:<id>:done           BITS  bit <chunk> = 1: finished (its completion record is in the store)
    slip:job:<id>:retry          HASH  chunk -> due time: failed for now, to be sent again then
    slip:job:<id>:resends        HASH  chunk -> times sent again (bounded by SLIP_MAX_RESENDS)
    slip:job:<id>:deliveries     HASH  chunk -> times a worker started it (poison guard, SLIP_MAX_DELIVERIES)
    slip:job:<id>:suspects       HASH  chunk -> when it was first found nowhere (lost-message guard)
    slip:hb:<worker instance>    STR   the worker's node name; expires SLIP_DEAD_AFTER after its last beat
    slip:lock:<name>             STR   a lease (SET NX PX) held by one process at a time

Memory per job is bounded by its in-flight window (the hashes) plus one bit per chunk; nothing per image.
The client retries on connection errors with back-off (about 40 s), so a Redis restart is ridden out.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

PREFIX = "slip"
REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


def connect(url: str, *, retries: int = 12) -> redis.Redis:
    """A Redis client that retries commands through a restart (exponential back-off, capped at 4 s)."""
    return redis.Redis.from_url(
        url, socket_connect_timeout=5, socket_timeout=15, health_check_interval=10,
        retry=Retry(ExponentialBackoff(cap=4.0, base=0.25), retries),
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
    )


@dataclass(frozen=True)
class JobView:
    """One job as the cluster sees it, read in one round trip."""

    active: bool  # registered and not finished
    chunks: int  # chunks in the job
    window: int  # chunks in flight at most
    next: int  # first chunk never sent
    sent: dict[int, dict]  # chunk -> {"task", "at", "attempt"}
    running: dict[int, dict]  # chunk -> {"task", "worker", "node", "at"}
    retry: dict[int, float]  # chunk -> due time (epoch seconds)


class JobBoard:
    """Reads and writes the keys above (keyword-only options, one Redis client)."""

    def __init__(self, client: redis.Redis, *, prefix: str = PREFIX) -> None:
        self.r = client
        self.prefix = prefix

    # --- keys -----------------------------------------------------------------------------------------------

    def key(self, job_id: str, part: str = "") -> str:
        return f"{self.prefix}:job:{job_id}" + (f":{part}" if part else "")

    @property
    def jobs_key(self) -> str:
        return f"{self.prefix}:jobs"

    # --- jobs -----------------------------------------------------------------------------------------------

    def register(self, job_id: str, *, chunks: int, window: int) -> None:
        """Hand a job to the cluster (idempotent: a second call keeps the progress made)."""
        pipe = self.r.pipeline()
        pipe.hsetnx(self.key(job_id), "next", 0)
        pipe.hset(self.key(job_id), mapping={"chunks": chunks, "window": window, "state": "active"})
        pipe.hsetnx(self.key(job_id), "created", time.time())
        pipe.sadd(self.jobs_key, job_id)
        pipe.execute()

    def active_jobs(self) -> list[str]:
        return sorted(m.decode() for m in self.r.smembers(self.jobs_key))

    def view(self, job_id: str) -> JobView:
        pipe = self.r.pipeline()
        pipe.hgetall(self.key(job_id))
        pipe.hgetall(self.key(job_id, "sent"))
        pipe.hgetall(self.key(job_id, "running"))
        pipe.hgetall(self.key(job_id, "retry"))
        head, sent, running, retry = pipe.execute()
        head = {k.decode(): v.decode() for k, v in head.items()}
        return JobView(
            active=head.get("state") == "active",
            chunks=int(head.get("chunks", 0)), window=int(head.get("window", 1)), next=int(head.get("next", 0)),
            sent=_json_fields(sent), running=_json_fields(running),
            retry={int(k): float(v) for k, v in retry.items()},
        )

    def done_bits(self, job_id: str) -> bytes:
        return self.r.get(self.key(job_id, "done")) or b""

    def finish_job(self, job_id: str, *, keep_s: int) -> None:
        """Stop feeding a finished job; its keys expire after ``keep_s`` seconds."""
        pipe = self.r.pipeline()
        pipe.hset(self.key(job_id), "state", "finished")
        pipe.srem(self.jobs_key, job_id)
        for part in ("", "sent", "running", "done", "retry", "resends", "deliveries", "suspects"):
            pipe.expire(self.key(job_id, part), keep_s)
        pipe.execute()

    # --- chunks ---------------------------------------------------------------------------------------------

    def mark_sent(self, job_id: str, chunk: int, task_id: str, *, attempt: int, advance_to: int | None = None) -> None:
        """Record a chunk as sent (before its message is published); ``advance_to`` moves ``next``."""
        pipe = self.r.pipeline()
        pipe.hset(self.key(job_id, "sent"), chunk, json.dumps({"task": task_id, "at": time.time(), "attempt": attempt}))
        pipe.hdel(self.key(job_id, "running"), chunk)  # a dead worker's mark goes: the chunk is sent again once
        pipe.hdel(self.key(job_id, "retry"), chunk)
        pipe.hdel(self.key(job_id, "suspects"), chunk)
        if advance_to is not None:
            pipe.hset(self.key(job_id), "next", advance_to)
        pipe.execute()

    def advance(self, job_id: str, next_chunk: int) -> None:
        """Move the job's first never-sent chunk to ``next_chunk``."""
        self.r.hset(self.key(job_id), "next", next_chunk)

    def mark_running(self, job_id: str, chunk: int, *, task_id: str, worker: str, node: str) -> int:
        """A worker starts a chunk; returns how many times the chunk was started (poison guard)."""
        pipe = self.r.pipeline()
        pipe.hset(self.key(job_id, "running"), chunk,
                  json.dumps({"task": task_id, "worker": worker, "node": node, "at": time.time()}))
        pipe.hincrby(self.key(job_id, "deliveries"), chunk, 1)
        return int(pipe.execute()[1])

    def clear_running(self, job_id: str, chunk: int) -> None:
        """A worker gave a chunk up without finishing it (an exception): nobody holds it now."""
        self.r.hdel(self.key(job_id, "running"), chunk)

    def mark_finished(self, job_id: str, chunk: int, *, retry_at: float | None = None) -> None:
        """A chunk's completion record is in the store; ``retry_at``: some items failed for now and the chunk
        is to be sent again at that time."""
        pipe = self.r.pipeline()
        if retry_at is None:
            pipe.setbit(self.key(job_id, "done"), chunk, 1)
        else:
            pipe.hset(self.key(job_id, "retry"), chunk, retry_at)
        pipe.hdel(self.key(job_id, "deliveries"), chunk)  # it finished: none of its starts killed a worker
        pipe.hdel(self.key(job_id, "sent"), chunk)
        pipe.hdel(self.key(job_id, "running"), chunk)
        pipe.execute()

    def mark_done(self, job_id: str, chunks: list[int]) -> None:
        """Set the finished bits of ``chunks`` (a job handed back to the cluster after Redis lost it)."""
        pipe = self.r.pipeline()
        for chunk in chunks:
            pipe.setbit(self.key(job_id, "done"), chunk, 1)
        pipe.execute()

    def reopen(self, job_id: str, chunks: list[int]) -> None:
        """Make finished chunks unfinished again and due now (``slip retry``), and reactivate the job."""
        pipe = self.r.pipeline()
        for chunk in chunks:
            pipe.setbit(self.key(job_id, "done"), chunk, 0)
            pipe.hset(self.key(job_id, "retry"), chunk, 0)
            pipe.hdel(self.key(job_id, "resends"), chunk)
            pipe.hdel(self.key(job_id, "deliveries"), chunk)
        pipe.hset(self.key(job_id), "state", "active")
        pipe.sadd(self.jobs_key, job_id)
        pipe.execute()

    def count_resend(self, job_id: str, chunk: int) -> int:
        return int(self.r.hincrby(self.key(job_id, "resends"), chunk, 1))

    def resends(self, job_id: str, chunk: int) -> int:
        return int(self.r.hget(self.key(job_id, "resends"), chunk) or 0)

    def suspect_since(self, job_id: str, chunk: int, now: float) -> float:
        """When ``chunk`` was first found held nowhere (set to ``now`` on the first call)."""
        key = self.key(job_id, "suspects")
        self.r.hsetnx(key, chunk, now)
        return float(self.r.hget(key, chunk) or now)

    def clear_suspect(self, job_id: str, chunk: int) -> None:
        self.r.hdel(self.key(job_id, "suspects"), chunk)

    # --- workers and leases --------------------------------------------------------------------------------

    def beat(self, instance: str, node: str, *, ttl_s: float) -> None:
        self.r.set(f"{self.prefix}:hb:{instance}", node, px=int(ttl_s * 1000))

    def alive(self, instances: list[str]) -> set[str]:
        if not instances:
            return set()
        values = self.r.mget([f"{self.prefix}:hb:{i}" for i in instances])
        return {i for i, v in zip(instances, values) if v is not None}

    def renew(self, name: str, token: str, *, ttl_s: float) -> bool:
        """Extend the lease ``name`` this caller holds (False when it was lost to expiry)."""
        return bool(self.r.eval("if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], "
                                "ARGV[2]) end return 0", 1, f"{self.prefix}:lock:{name}", token, int(ttl_s * 1000)))

    def lease(self, name: str, *, ttl_s: float) -> str | None:
        """A token when this caller now holds the lease ``name`` for ``ttl_s`` seconds, else None."""
        token = uuid.uuid4().hex
        return token if self.r.set(f"{self.prefix}:lock:{name}", token, nx=True, px=int(ttl_s * 1000)) else None

    def release(self, name: str, token: str) -> None:
        """Give the lease back if this caller still holds it."""
        self.r.eval("if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0",
                    1, f"{self.prefix}:lock:{name}", token)


def _json_fields(raw: dict) -> dict[int, dict]:
    return {int(k): json.loads(v) for k, v in raw.items()}
