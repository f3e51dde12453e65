"""The ticker: each worker's main process beats a heartbeat and, one worker at a time, feeds the jobs.

Two daemon threads in the worker's main process (started when the worker is ready, stopped at shutdown),
so that a slow feeder pass (a manifest read from S3, a Redis retry) never delays a heartbeat:

* every ``SLIP_HEARTBEAT`` seconds it sets ``slip:hb:<instance>`` with a time-to-live of
  ``SLIP_DEAD_AFTER`` seconds; a worker killed outright stops beating and, ``SLIP_DEAD_AFTER`` seconds
  later, counts as dead: the chunks it held are sent again (:mod:`worker.feeder`);
* every ``SLIP_TICK`` seconds it tries to take the lease ``slip:lock:tick``; whoever holds it runs one
  feeder pass over every active job. Any live worker can take over, so the cluster feeds itself as long as
  one worker runs: no process of its own, no producer needed.

Redis or store trouble is logged (once per outage) and the next beat tries again.
"""

from __future__ import annotations

import logging
import threading
import time

from worker.board import JobBoard
from worker.feeder import Feeder
from worker.settings import Settings

log = logging.getLogger("slip.ticker")


class Ticker:
    """The heartbeat and feeder thread of one worker (keyword-only options)."""

    def __init__(self, *, board: JobBoard, feeder: Feeder, settings: Settings, instance: str, node: str) -> None:
        self.board = board
        self.feeder = feeder
        self.settings = settings
        self.instance = instance  # this worker's id in heartbeats and running marks
        self.node = node  # the Celery node name, for people
        self._stop = threading.Event()
        self._threads = (threading.Thread(target=self._beat_loop, name="slip-heartbeat", daemon=True),
                         threading.Thread(target=self._tick_loop, name="slip-ticker", daemon=True))
        self._failing = {"heartbeat": False, "ticker": False}

    def start(self) -> None:
        for thread in self._threads:
            thread.start()
        log.info("ticker %s (%s): heartbeat every %.1f s, feeder pass every %.1f s", self.instance, self.node,
                 self.settings.heartbeat_s, self.settings.tick_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout_s)

    def _beat_loop(self) -> None:
        self._loop("heartbeat", self.settings.heartbeat_s,
                   lambda: self.board.beat(self.instance, self.node, ttl_s=self.settings.dead_after_s))

    def _tick_loop(self) -> None:
        self._loop("ticker", self.settings.tick_s, self._tick)

    def _loop(self, name: str, every_s: float, step) -> None:
        """``step()`` every ``every_s`` seconds until stopped; trouble (Redis or the store away) is said once."""
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                step()
                self._recovered(name)
            except Exception as e:  # classified by nobody: the next round tries again
                self._failed(name, e)
            self._stop.wait(max(0.0, every_s - (time.monotonic() - started)))

    def _tick(self) -> None:
        token = self.board.lease("tick", ttl_s=max(3 * self.settings.tick_s, 10.0))
        if token is None:
            return  # another worker runs this round
        try:
            for report in self.feeder.tick():
                if report.resent or report.gave_up or report.finished:
                    log.info("job %s: resent %s, gave up %s, finished %s", report.job_id, report.resent,
                             report.gave_up, report.finished)
        finally:
            self.board.release("tick", token)

    def _failed(self, name: str, e: Exception) -> None:
        if not self._failing[name]:
            log.warning("%s: %s: %s (trying again)", name, type(e).__name__, e)
        self._failing[name] = True

    def _recovered(self, name: str) -> None:
        if self._failing[name]:
            log.info("%s: Redis and the store answer again", name)
        self._failing[name] = False
