"""The cluster feeds itself: top jobs up to their in-flight window, re-send what nothing will finish.

:meth:`Feeder.feed` runs for one job under a lease (``slip:lock:feed:<job>``), so at most one process
feeds a job at a time; it is idempotent and can run anywhere that reaches Redis and the store. It is
called by the producer right after a submit, by a worker right after it finishes a chunk, and every
``SLIP_TICK`` seconds by the ticker of whichever worker holds the tick lease (:mod:`worker.heartbeat`).
One pass, in order:

1. chunks held by a worker whose heartbeat expired (``SLIP_DEAD_AFTER``), or held past the hard time limit
   (``SLIP_TASK_TIME_LIMIT`` + 60 s): sent again;
2. sent chunks that no worker runs and the broker no longer holds, for ``SLIP_LOST_AFTER``: sent again;
3. chunks whose items failed for now, once their back-off is due: sent again;
4. new chunks, until ``window`` chunks are in flight;
5. a job with every chunk finished is no longer fed (its keys expire).

A chunk is sent again at most ``SLIP_MAX_RESENDS`` times; after that its unfinished images are recorded
as failed for now (``slip retry`` re-runs them on purpose). Sending twice is safe: a task skips images
whose result exists, so each image still gets exactly one result.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import redis
from kombu.exceptions import OperationalError

from slip.errors import BrokerError
from worker.board import JobBoard, JobView
from worker.broker import FIRST_SEND, MODEL_QUEUE, SENT_AGAIN, Holdings
from worker.jobs import ChunkRecord, Item, ItemOutcome, JobManifest, SegmentRequest
from worker.ledger import load_manifest, load_page, record_chunk
from worker.settings import Settings
from worker.store import Store

log = logging.getLogger("slip.feeder")

Publish = Callable[[SegmentRequest, str, bool], None]  # (request, task id, sent again?): queue the message
SEND_RETRY = {"max_retries": 20, "interval_start": 0.5, "interval_step": 1.0, "interval_max": 4.0}  # ~60 s
LEASE_S = 10.0  # a feed pass's lease on its job, renewed as it sends: a killed feeder blocks the job this long
PAGE_CACHE = 16  # manifest pages kept in memory per feeder


@dataclass
class FeedReport:
    """What one pass did to one job."""

    job_id: str
    sent: list[int] = field(default_factory=list)  # new chunks sent
    resent: dict[int, str] = field(default_factory=dict)  # chunk -> why it was sent again
    gave_up: list[int] = field(default_factory=list)  # chunks past SLIP_MAX_RESENDS
    finished: bool = False  # the job is complete and no longer fed


class Feeder:
    """Feeds jobs from their manifests in ``store`` through ``publish``; state in ``board``."""

    def __init__(self, *, board: JobBoard, store: Store, publish: Publish, settings: Settings,
                 broker: Callable[[], Holdings]) -> None:
        self.board = board
        self.store = store
        self.publish = publish
        self.settings = settings
        self.broker = broker  # reads the broker's holdings, only when a chunk looks lost
        self._manifests: OrderedDict[str, JobManifest] = OrderedDict()
        self._lease: tuple[str, str] | None = None  # (name, token) of the job lease held during a pass
        self._pages: OrderedDict[tuple[str, int], list[Item]] = OrderedDict()

    def tick(self) -> list[FeedReport]:
        """One pass over every active job (jobs fed elsewhere right now are skipped)."""
        return [r for job in self.board.active_jobs() if (r := self.feed(job)) is not None]

    def feed(self, job_id: str) -> FeedReport | None:
        """One pass over ``job_id``; None when another process holds its lease."""
        token = self.board.lease(f"feed:{job_id}", ttl_s=LEASE_S)
        if token is None:
            return None
        self._lease = (f"feed:{job_id}", token)
        try:
            return self._pass(job_id)
        finally:
            self._lease = None
            self.board.release(f"feed:{job_id}", token)

    # --- the pass ------------------------------------------------------------------------------------------

    def _pass(self, job_id: str) -> FeedReport:
        view, report, now = self.board.view(job_id), FeedReport(job_id), time.time()
        if not view.active:
            return report
        # 1. chunks whose worker stopped beating, or that ran past the hard time limit
        alive = self.board.alive(sorted({run["worker"] for run in view.running.values()}))
        overdue = self.settings.task_time_limit_s + 60
        for chunk, run in view.running.items():
            if run["worker"] not in alive:
                self._resend(job_id, chunk, f"worker {run['node']} stopped beating", report)
            elif now - run["at"] > overdue:
                self._resend(job_id, chunk, f"it ran on {run['node']} past the hard time limit", report)
        # 2. sent chunks that nothing holds any more
        for chunk in self._lost(job_id, view, now):
            self._resend(job_id, chunk, "its message was lost", report)
        # 3. chunks whose failures are due for another try
        for chunk, due in view.retry.items():
            if due <= now:
                self._resend(job_id, chunk, "some images failed for now", report)
        # 4. new chunks up to the window; 5. the end of the job
        in_flight = len(view.sent) + len([c for c in report.resent if c not in view.sent])
        self._top_up(job_id, view, in_flight, report)
        if not report.sent and not report.resent and not view.sent and not view.retry and view.next >= view.chunks:
            self._finish_if_complete(job_id, view, report)
        return report

    def _lost(self, job_id: str, view: JobView, now: float) -> list[int]:
        """Sent chunks no worker runs that the broker has not held for SLIP_LOST_AFTER."""
        grace = self.settings.lost_after_s
        candidates = [c for c, sent in view.sent.items() if c not in view.running and now - sent["at"] > grace]
        if not candidates:
            return []
        holdings, lost = self.broker(), []
        for chunk in candidates:
            task = view.sent[chunk]["task"]
            handed_at = holdings.unacked.get(task)
            if task in holdings.queued or (handed_at is not None and now - handed_at < grace):
                self.board.clear_suspect(job_id, chunk)
            elif now - self.board.suspect_since(job_id, chunk, now) >= min(grace / 2, 10.0):
                lost.append(chunk)  # seen missing on two passes: not a message in transit
        return lost

    def _top_up(self, job_id: str, view: JobView, in_flight: int, report: FeedReport) -> None:
        chunk = view.next
        done = self.board.done_bits(job_id) if chunk < view.chunks else b""
        while in_flight < view.window and chunk < view.chunks:
            if not _bit(done, chunk):  # a resumed job skips chunks finished before
                self._send(job_id, chunk, attempt=0, advance_to=chunk + 1)
                report.sent.append(chunk)
                in_flight += 1
            chunk += 1
        if chunk != view.next:
            self.board.advance(job_id, chunk)

    def _finish_if_complete(self, job_id: str, view: JobView, report: FeedReport) -> None:
        done = self.board.done_bits(job_id)
        missing = [c for c in range(view.chunks) if not _bit(done, c)]
        for chunk in missing:  # sent once, then forgotten (a Redis restart that lost writes): send again
            self._resend(job_id, chunk, "it was never finished", report)
        if not missing:
            self.board.finish_job(job_id, keep_s=self.settings.result_expires_s)
            self._manifests.pop(job_id, None)
            report.finished = True
            log.info("job %s finished", job_id)

    def _resend(self, job_id: str, chunk: int, why: str, report: FeedReport) -> None:
        count = self.board.count_resend(job_id, chunk)
        if count > self.settings.max_resends:
            self._give_up(job_id, chunk, f"gave up after {count - 1} re-sends; last: {why}")
            report.gave_up.append(chunk)
            return
        log.warning("job %s chunk %d: sending again (%d/%d): %s", job_id, chunk, count, self.settings.max_resends, why)
        self._send(job_id, chunk, attempt=count)
        report.resent[chunk] = why

    def _send(self, job_id: str, chunk: int, *, attempt: int, advance_to: int | None = None) -> None:
        """Record the chunk as sent, then publish it (a crash in between looks lost, and is sent again)."""
        manifest = self._manifest(job_id)
        request = SegmentRequest(job_id=job_id, chunk=chunk, items=tuple(self._items(manifest, chunk)),
                                 spec=manifest.spec)
        task_id = str(uuid.uuid4())
        self.board.mark_sent(job_id, chunk, task_id, attempt=attempt, advance_to=advance_to)
        self.publish(request, task_id, attempt > 0)
        if self._lease is not None:
            self.board.renew(*self._lease, ttl_s=LEASE_S)

    def _give_up(self, job_id: str, chunk: int, reason: str) -> None:
        manifest = self._manifest(job_id)
        outcomes = [ItemOutcome(index=i, state="failed", permanent=False, reason=reason, error="GaveUp")
                    for i in manifest.chunk_range(chunk)]
        record = ChunkRecord(job_id=job_id, chunk=chunk, task_id="", worker="feeder", finished=_now(), items=outcomes)
        record_chunk(self.store, record, replace_earlier=False)  # readers keep any item done earlier
        self.board.mark_finished(job_id, chunk)
        log.error("job %s chunk %d: %s", job_id, chunk, reason)

    # --- manifests ------------------------------------------------------------------------------------------

    def _manifest(self, job_id: str) -> JobManifest:
        if job_id not in self._manifests:
            self._manifests[job_id] = load_manifest(self.store, job_id)
            while len(self._manifests) > PAGE_CACHE:
                self._manifests.popitem(last=False)
        return self._manifests[job_id]

    def _items(self, manifest: JobManifest, chunk: int) -> list[Item]:
        indices = manifest.chunk_range(chunk)
        items = []
        for page in sorted({manifest.page_of(i) for i in indices}):
            key = (manifest.job_id, page)
            if key not in self._pages:
                self._pages[key] = load_page(self.store, manifest, page)
                while len(self._pages) > PAGE_CACHE:
                    self._pages.popitem(last=False)
            start = page * manifest.page_size
            items += [self._pages[key][i - start] for i in indices if manifest.page_of(i) == page]
        return items


def publisher(app) -> Publish:
    """``publish(request, task_id, again)`` for a Celery ``app``: one ``slip.segment`` message on the model
    queue, sent by name (the sender needs no task code), ridden through broker blips (about a minute). A chunk
    sent again goes ahead of every first send, so a dead worker's images do not wait behind the job's window."""

    def publish(request: SegmentRequest, task_id: str, again: bool) -> None:
        try:
            app.send_task("slip.segment", kwargs={"request": request.model_dump(mode="json")}, task_id=task_id,
                          queue=MODEL_QUEUE, priority=SENT_AGAIN if again else FIRST_SEND,
                          kwargsrepr=_describe(request), retry=True, retry_policy=SEND_RETRY)
        except (OperationalError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
            raise BrokerError(f"cannot reach Redis at {app.conf.broker_url} to send job {request.job_id} chunk "
                              f"{request.chunk}: {e}; the cluster sends it again once Redis is back") from e

    return publish


def _describe(request: SegmentRequest) -> str:
    """Short task description for Flower (the full payload stays in the message)."""
    prompts = ", ".join(request.spec.prompts)
    prompts = prompts if len(prompts) <= 60 else prompts[:57] + "..."
    items = request.items
    return (f"job={request.job_id} chunk={request.chunk} items={items[0].index}..{items[-1].index} ({len(items)}) "
            f"prompts=[{prompts}]")


def _bit(bits: bytes, index: int) -> bool:
    """Bit ``index`` of a Redis bitmap (most significant bit first in each byte, as SETBIT writes)."""
    byte = index >> 3
    return byte < len(bits) and bool(bits[byte] & (0x80 >> (index & 7)))


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
