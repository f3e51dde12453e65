"""A job in Redis: which chunks are sent, held and finished, and which attempt of each is current.

Per job (expiring ``SLIP_RESULT_EXPIRES`` after it finishes): ``slip:job:<id>`` (hash: kind, total, chunks,
window, next, state, times, unit counters, ``a<chunk>`` = a chunk's current attempt when > 0),
``slip:job:<id>:running`` (hash: chunk -> running mark) and ``slip:job:<id>:done`` (a bit per chunk).
Global: ``slip:jobs`` (zset by creation), ``slip:active`` (set), ``slip:workers`` (hash of heartbeats).
docs/ARCHITECTURE.md has the table. Every change that must not race is one Lua script, atomic in Redis.
"""

from __future__ import annotations

import json
import time

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from jobs.status import JobView

PREFIX = "slip"
# KEYS of every script: the job hash, its running hash, its done bits
CLAIM = """if redis.call('HGET', KEYS[1], 'state') ~= 'active' then return {} end
local f = redis.call('HMGET', KEYS[1], 'chunks', 'window', 'next')
local chunks, window, n, done, out = tonumber(f[1]), tonumber(f[2]), tonumber(f[3]), 0, {}
if n > 0 then done = redis.call('BITCOUNT', KEYS[3], 0, n - 1, 'BIT') end
while n < chunks and n - done < window do
  if redis.call('GETBIT', KEYS[3], n) == 1 then done = done + 1 else out[#out + 1] = n end
  n = n + 1
end
redis.call('HSET', KEYS[1], 'next', n)
return out"""
BEGIN = """local c, a = ARGV[1], tonumber(ARGV[2])
local current = tonumber(redis.call('HGET', KEYS[1], 'a' .. c) or '0')
if redis.call('GETBIT', KEYS[3], c) == 1 or a < current then return 0 end
if a == current and redis.call('HEXISTS', KEYS[2], c) == 1 then return 0 end
if a > current then redis.call('HSET', KEYS[1], 'a' .. c, a) end
redis.call('HSET', KEYS[1], 'progress', ARGV[4])
redis.call('HSETNX', KEYS[1], 'started', ARGV[4])
redis.call('HSET', KEYS[2], c, ARGV[3])
return 1"""
FINISH = """local c, a = ARGV[1], tonumber(ARGV[2])
if redis.call('HGET', KEYS[2], c) == ARGV[3] then redis.call('HDEL', KEYS[2], c) end
redis.call('HSET', KEYS[1], 'progress', ARGV[7])
if ARGV[4] == '1' then
  if tonumber(redis.call('HGET', KEYS[1], 'a' .. c) or '0') > a then return -1 end
  redis.call('HSET', KEYS[1], 'a' .. c, a + 1)
  return -2
end
if redis.call('SETBIT', KEYS[3], c, 1) == 0 then
  redis.call('HINCRBY', KEYS[1], 'done', ARGV[5])
  redis.call('HINCRBY', KEYS[1], 'failed', ARGV[6])
end
redis.call('HDEL', KEYS[1], 'a' .. c)
return redis.call('BITCOUNT', KEYS[3]) == tonumber(redis.call('HGET', KEYS[1], 'chunks') or '-1') and 1 or 0"""
RECLAIM = """if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return -1 end
redis.call('HDEL', KEYS[2], ARGV[1])
if redis.call('GETBIT', KEYS[3], ARGV[1]) == 1 then return -1 end
return redis.call('HINCRBY', KEYS[1], 'a' .. ARGV[1], 1)"""
RELOST = """local f = redis.call('HMGET', KEYS[1], 'state', 'progress', 'created', 'next')
if f[1] ~= 'active' or redis.call('HLEN', KEYS[2]) > 0 then return {} end
if tonumber(ARGV[1]) - tonumber(f[2] or f[3] or '0') < tonumber(ARGV[2]) then return {} end
redis.call('HSET', KEYS[1], 'progress', ARGV[1])
local out = {}
for c = 0, tonumber(f[4] or '0') - 1 do
  if redis.call('GETBIT', KEYS[3], c) == 0 then
    out[#out + 1] = c
    out[#out + 1] = redis.call('HINCRBY', KEYS[1], 'a' .. c, 1)
  end
end
return out"""


def connect(url: str, *, retries: int = 12) -> redis.Redis:
    """A Redis client that retries commands through a restart (exponential back-off, capped at 4 s)."""
    return redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=15, health_check_interval=10,
                                retry=Retry(ExponentialBackoff(cap=4.0, base=0.25), retries),
                                retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError])


class Board:
    """Reads and writes a job's keys (one Redis client)."""

    def __init__(self, client: redis.Redis, *, prefix: str = PREFIX) -> None:
        self.r, self.prefix = client, prefix
        self._scripts = {name: client.register_script(text) for name, text in
                         (("claim", CLAIM), ("begin", BEGIN), ("finish", FINISH), ("reclaim", RECLAIM),
                          ("relost", RELOST))}

    def key(self, job_id: str, part: str = "") -> str:
        return f"{self.prefix}:job:{job_id}" + (f":{part}" if part else "")

    def _run(self, script: str, job_id: str, *args):
        keys = [self.key(job_id), self.key(job_id, "running"), self.key(job_id, "done")]
        return self._scripts[script](keys=keys, args=list(args))

    def register(self, job_id: str, *, kind: str, chunks: int, total: int, window: int, created: float) -> None:
        """Hand a job to the cluster (idempotent: a second call keeps the progress made)."""
        pipe = self.r.pipeline()
        pipe.hsetnx(self.key(job_id), "next", 0)
        pipe.hsetnx(self.key(job_id), "created", created)
        pipe.hset(self.key(job_id), mapping={"kind": kind, "chunks": chunks, "total": total, "window": window,
                                             "state": "active"})
        pipe.zadd(f"{self.prefix}:jobs", {job_id: created})
        pipe.sadd(f"{self.prefix}:active", job_id)
        for part in ("", "running", "done"):
            pipe.persist(self.key(job_id, part))
        pipe.execute()

    def claim(self, job_id: str) -> list[int]:
        """Chunks to send now: ``next`` moves on while the job's window has room (atomic: never over it)."""
        return [int(c) for c in self._run("claim", job_id)]

    def begin(self, job_id: str, chunk: int, attempt: int, mark: str) -> bool:
        """A worker process starts ``attempt`` of ``chunk``, holding it with ``mark`` (JSON); False when the
        delivery is stale, nothing to be done: the chunk is finished, a later attempt was sent, or this attempt is
        held already (the message Celery put back after its pool process died, or a second delivery while it
        runs: a crashed attempt is sent again by a reaper as the next one, so each crash spends the budget)."""
        return bool(self._run("begin", job_id, chunk, attempt, mark, time.time()))

    def finish(self, job_id: str, chunk: int, attempt: int, mark: str, *, again: bool, done: int, failed: int) -> int:
        """The chunk's record is in the store. ``again`` (units failed for now, attempts left): -2 = send
        attempt + 1, -1 = a later one was sent; else finished for good, its ``done`` / ``failed`` units counted
        once: 1 when that finished the job, 0 otherwise."""
        return int(self._run("finish", job_id, chunk, attempt, mark, int(again), done, failed, time.time()))

    def release(self, job_id: str, chunk: int, mark: str) -> None:
        """A worker gave the chunk up without finishing it (an exception): it holds it no more."""
        self.r.eval("if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then redis.call('HDEL', KEYS[1], ARGV[1]) end",
                    1, self.key(job_id, "running"), chunk, mark)

    def reclaim(self, job_id: str, chunk: int, mark: str) -> int | None:
        """Take ``chunk`` from the dead holder that left ``mark``: its next attempt, or None when somebody
        else took it first or it is finished."""
        attempt = int(self._run("reclaim", job_id, chunk, mark))
        return None if attempt < 0 else attempt

    def relost(self, job_id: str, *, idle_s: float) -> list[tuple[int, int]]:
        """(chunk, attempt) of each sent, unfinished chunk of a job nobody runs that made no progress for
        ``idle_s`` seconds (its messages are lost); empty otherwise. Atomic: one caller gets them."""
        out = self._run("relost", job_id, time.time(), idle_s)
        return list(zip(map(int, out[0::2]), map(int, out[1::2])))

    def close(self, job_id: str, *, keep_s: int) -> None:
        """The job is finished: no longer fed; its keys expire after ``keep_s`` seconds."""
        pipe = self.r.pipeline()
        pipe.hset(self.key(job_id), mapping={"state": "finished", "finished": time.time()})
        pipe.srem(f"{self.prefix}:active", job_id)
        for part in ("", "running", "done"):
            pipe.expire(self.key(job_id, part), keep_s)
        pipe.execute()

    def reopen(self, job_id: str, letters: dict[int, str]) -> None:
        """Finished chunks (chunk -> letters) become unfinished (``slip retry``); their units leave the counts."""
        pipe = self.r.pipeline()
        for chunk in letters:
            pipe.setbit(self.key(job_id, "done"), chunk, 0)
            pipe.hdel(self.key(job_id), f"a{chunk}")
        self._count(pipe, job_id, letters, sign=-1)
        pipe.execute()

    def mark_done(self, job_id: str, letters: dict[int, str]) -> None:
        """Chunks the store says are finished (chunk -> letters), for a job Redis lost (``slip retry``)."""
        pipe = self.r.pipeline()
        for chunk in letters:
            pipe.setbit(self.key(job_id, "done"), chunk, 1)
        self._count(pipe, job_id, letters, sign=1)
        pipe.execute()

    def _count(self, pipe, job_id: str, letters: dict[int, str], *, sign: int) -> None:
        done = sum(v.count("d") for v in letters.values())
        pipe.hincrby(self.key(job_id), "done", sign * done)
        pipe.hincrby(self.key(job_id), "failed", sign * (sum(map(len, letters.values())) - done))

    def active(self) -> list[str]:
        return sorted(m.decode() for m in self.r.smembers(f"{self.prefix}:active"))

    def views(self, job_ids: list[str]) -> list[JobView]:
        """Each job's keys and every worker's heartbeat, in one round trip."""
        pipe = self.r.pipeline()
        for job_id in job_ids:
            pipe.hgetall(self.key(job_id))
            pipe.hgetall(self.key(job_id, "running"))
            pipe.get(self.key(job_id, "done"))
        pipe.hgetall(f"{self.prefix}:workers")
        *raw, beats = pipe.execute()
        workers = {k.decode(): json.loads(v) for k, v in beats.items()}
        return [JobView(head={k.decode(): v.decode() for k, v in head.items()}, done=done or b"", workers=workers,
                        running={int(c): json.loads(m) for c, m in running.items()})
                for head, running, done in zip(raw[0::3], raw[1::3], raw[2::3])]

    def view(self, job_id: str) -> JobView:
        return self.views([job_id])[0]

    def beat(self, instance: str, record: dict) -> None:
        self.r.hset(f"{self.prefix}:workers", instance, json.dumps(record))

    def prune(self, *, now: float, workers_after_s: float, jobs_after_s: float) -> None:
        """Forget heartbeats older than ``workers_after_s`` and registry entries of jobs Redis expired."""
        beats = self.r.hgetall(f"{self.prefix}:workers")
        gone = [i for i, b in beats.items() if now - float(json.loads(b).get("at", 0)) > workers_after_s]
        old = self.r.zrangebyscore(f"{self.prefix}:jobs", "-inf", now - jobs_after_s)
        expired = [j for j in old if not self.r.exists(self.key(j.decode()))]
        if gone:
            self.r.hdel(f"{self.prefix}:workers", *gone)
        if expired:
            self.r.zrem(f"{self.prefix}:jobs", *expired)
