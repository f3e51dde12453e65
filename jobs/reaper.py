"""The reaper: each worker's main process beats and, on every beat, mends what Celery's redelivery does not.

A daemon thread, a beat every ``SLIP_DEAD_AFTER / 6`` seconds, no lease (each change is one atomic script of
:mod:`jobs.board`, so two reapers never send a chunk twice). Per beat: the heartbeat; chunks whose holder is
gone sent again at once ahead of every first send (a pool process of *this* worker that died, a worker that
stopped beating for ``SLIP_DEAD_AFTER``, a chunk past the hard time limit); each active job topped up; a job
idle for ``SLIP_LOST_AFTER`` with nothing running or queued has its unfinished chunks sent again (their
messages were lost); finished jobs closed; temporaries of dead writers swept. Trouble is logged once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
from typing import Callable

from jobs.board import Board
from jobs.broker import Send
from jobs.processes import alive, children
from jobs.settings import Settings
from jobs.status import JobView
from jobs.store import Store

log = logging.getLogger("slip.reaper")
OVERDUE_S = 60.0  # a chunk held this long past the hard time limit is taken back
PRUNE_EVERY = 500  # beats between prunes of old heartbeats and expired registry entries


def mark_json(mark: dict) -> str:
    """The one serialisation of a running mark (the board compares marks by their text)."""
    return json.dumps(mark, sort_keys=True, separators=(",", ":"))


class Reaper:
    """The heartbeat thread of one worker (keyword-only options)."""

    def __init__(self, *, board: Board, store: Store, settings: Settings, send: Send, queue_empty: Callable[[], bool],
                 instance: str, node: str, units: Callable[[], int] = lambda: 0, serves: dict | None = None) -> None:
        self.board, self.store, self.settings, self.send = board, store, settings, send
        self.queue_empty = queue_empty  # whether the model queue holds no message (asked of idle jobs only)
        self.instance, self.node, self.units, self.serves = instance, node, units, serves  # serves: engine, sam, clip
        self.started, self._last, self._rate, self._beats = time.time(), (time.time(), 0), 0.0, 0
        self._failing, self._stop = False, threading.Event()
        self._thread = threading.Thread(target=self._loop, name="slip-reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("reaper %s (%s): a beat every %.1f s", self.instance, self.node, self.settings.heartbeat_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def _loop(self) -> None:
        while True:
            started = time.monotonic()
            try:
                self.beat()
                if self._failing:
                    log.info("reaper: Redis and the store answer again")
                self._failing = False
            except Exception as e:  # the next beat tries again
                if not self._failing:
                    log.warning("reaper: %s: %s (trying again)", type(e).__name__, e)
                self._failing = True
            if self._stop.wait(max(0.0, self.settings.heartbeat_s - (time.monotonic() - started))):
                return

    def beat(self, now: float | None = None) -> list[str]:
        """One beat: the heartbeat, then one pass over the active jobs; what it did, one line each."""
        now = time.time() if now is None else now
        (then, before), units = self._last, self.units()
        elapsed = max(now - then, 1e-3)
        self._rate += (1 - math.exp(-elapsed / 60)) * ((units - before) / elapsed - self._rate)  # units/s, ~1 min
        self._last = (now, units)
        self.board.beat(self.instance, {"node": self.node, "host": socket.gethostname(), "pid": os.getpid(),
                                        "pids": [os.getpid(), *children(os.getpid())], "at": now,
                                        "started": self.started, "units": units, "rate": round(self._rate, 3),
                                        "serves": self.serves})
        done = self.reap(now)
        self.store.sweep_temporaries(self.settings.task_time_limit_s)
        self._beats += 1
        if self._beats % PRUNE_EVERY == 1:
            self.board.prune(now=now, workers_after_s=3600.0, jobs_after_s=float(self.settings.result_expires_s))
        return done

    def reap(self, now: float) -> list[str]:
        jobs, done = self.board.active(), []
        for job_id, view in zip(jobs, self.board.views(jobs)):
            kind = view.head.get("kind", "segment")
            for chunk, mark in sorted(view.running.items()):
                why = self._gone(mark, view, now)
                if why and (attempt := self.board.reclaim(job_id, chunk, mark_json(mark))) is not None:
                    done.append(self._again(kind, job_id, chunk, attempt, why))
            for chunk in self.board.claim(job_id):
                self.send(kind, job_id, chunk, 0, again=False)
            idle = now - float(view.head.get("progress") or view.head.get("created") or now)
            if int.from_bytes(view.done, "big").bit_count() >= int(view.head.get("chunks", 0)) > 0:
                self.board.close(job_id, keep_s=self.settings.result_expires_s)
                done.append(f"job {job_id}: finished")
            elif not view.running and idle > self.settings.lost_after_s and self.queue_empty():
                for chunk, attempt in self.board.relost(job_id, idle_s=self.settings.lost_after_s):
                    done.append(self._again(kind, job_id, chunk, attempt, "its message was lost"))
        return done

    def _gone(self, mark: dict, view: JobView, now: float) -> str | None:
        """Why the holder of ``mark`` holds it no more, or None while it may."""
        if mark.get("worker") == self.instance:
            return None if alive(int(mark.get("pid", 0))) else f"its pool process {mark.get('pid')} died"
        beat = view.workers.get(mark.get("worker"))
        since = float(beat["at"]) if beat else float(mark.get("at", now))  # a new worker may not have beaten yet
        if now - since > self.settings.dead_after_s:
            return f"worker {mark.get('node')} stopped beating"
        if now - float(mark.get("at", now)) > self.settings.task_time_limit_s + OVERDUE_S:
            return f"it ran on {mark.get('node')} past the hard time limit"
        return None

    def _again(self, kind: str, job_id: str, chunk: int, attempt: int, why: str) -> str:
        line = f"job {job_id} chunk {chunk}: sending again (attempt {attempt}): {why}"
        log.warning("%s", line)
        self.send(kind, job_id, chunk, attempt, again=True)
        return line
