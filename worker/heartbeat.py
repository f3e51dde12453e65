"""The ticker: each worker's main process beats a heartbeat and, one worker at a time, feeds the jobs.

A daemon thread in the worker's main process (started when the worker is ready, stopped at shutdown):

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
        self._thread = threading.Thread(target=self._run, name="slip-ticker", daemon=True)
        self._failing = False

    def start(self) -> None:
        self._thread.start()
        log.info("ticker %s (%s): heartbeat every %.1f s, feeder pass every %.1f s", self.instance, self.node,
                 self.settings.heartbeat_s, self.settings.tick_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        next_tick = 0.0
        while not self._stop.is_set():
            try:
                self.board.beat(self.instance, self.node, ttl_s=self.settings.dead_after_s)
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + self.settings.tick_s
                    self._tick()
                self._recovered()
            except Exception as e:  # Redis or the store away: say so once, keep beating
                self._failed(e)
            self._stop.wait(self.settings.heartbeat_s)

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

    def _failed(self, e: Exception) -> None:
        if not self._failing:
            log.warning("ticker: %s: %s (retrying every %.1f s)", type(e).__name__, e, self.settings.heartbeat_s)
        self._failing = True

    def _recovered(self) -> None:
        if self._failing:
            log.info("ticker: Redis and the store answer again")
        self._failing = False
