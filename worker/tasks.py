"""The queue's tasks: plain functions over the process's warm resources, registered by :func:`register`.

``slip.segment`` processes one chunk of a job (see :mod:`worker.jobs`): it says so in Redis (running,
counted as a delivery), runs each image under the failure policy (:mod:`worker.policy`), writes the
chunk's completion record to the store, marks the chunk finished in Redis and tops its job up
(:mod:`worker.feeder`). Its return value is a small summary; the results live in the store, so Celery
keeps no result for it (Redis memory does not grow with the job).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from slip.errors import InputError, ModelMismatchError
from worker.jobs import ChunkRecord, ItemOutcome, SegmentRequest
from worker.ledger import record_chunk
from worker.policy import REDIS_ERRORS, FailurePolicy, failed
from worker.processing import process_item
from worker.resources import WorkerResources

log = logging.getLogger("slip.worker")

def segment(task, request: dict) -> dict:
    """Segment one chunk of a job (a :class:`SegmentRequest` as JSON); see the module docstring."""
    res = task.app.slip_resources.get()
    req = SegmentRequest.parse(request)
    record = run_chunk(res, req, task_id=task.request.id or "", node=task.request.hostname or res.hostname)
    return {"job_id": req.job_id, "chunk": req.chunk, "letters": record.letters}


def health(task) -> dict:
    """What this worker process has loaded (specs, digests, device, dtype, memory), its pid and host."""
    report = task.app.slip_resources.get().health()
    report["queues"] = sorted(task.app.amqp.queues.consume_from)
    report["worker"] = task.request.hostname
    return report


def feed(task, job_id: str) -> dict:
    """One feeder pass over a job (normally the workers' ticker does this; here on demand)."""
    report = task.app.slip_resources.get().feeder.feed(job_id)
    return {"job_id": job_id, "busy": report is None,
            **({} if report is None else {"sent": report.sent, "resent": report.resent, "finished": report.finished})}


def register(app: Celery) -> None:
    """Register the segment-side tasks on ``app``."""
    app.task(name="slip.segment", bind=True, ignore_result=True)(segment)
    app.task(name="slip.health", bind=True)(health)
    app.task(name="slip.feed", bind=True)(feed)


# --- plain functions ------------------------------------------------------------------------------


def run_chunk(res: WorkerResources, req: SegmentRequest, *, task_id: str, node: str) -> ChunkRecord:
    """Process every image of ``req``, record the chunk's completion, and top its job up."""
    policy = FailurePolicy.of(res.settings)
    deliveries = res.board.mark_running(req.job_id, req.chunk, task_id=task_id, worker=res.instance, node=node)
    try:
        outcomes = _outcomes(res, req, policy, deliveries)
        record = ChunkRecord(job_id=req.job_id, chunk=req.chunk, task_id=task_id, worker=node,
                             finished=datetime.now(timezone.utc).isoformat(timespec="milliseconds"), items=outcomes)
        resends = res.board.resends(req.job_id, req.chunk)
        record_chunk(res.store, record, replace_earlier=deliveries > 1 or resends > 0)
        delay = policy.retry_delay(resends) if "t" in record.letters else None
        res.board.mark_finished(req.job_id, req.chunk, retry_at=None if delay is None else time.time() + delay)
    except BaseException:
        _forget_running(res, req)  # the feeder then sees a sent chunk nobody holds, and sends it again
        raise
    _top_up(res, req.job_id)
    return record


def _outcomes(res: WorkerResources, req: SegmentRequest, policy: FailurePolicy, deliveries: int) -> list[ItemOutcome]:
    """Each image's outcome: poison, wrong models, bad options, or the policy's verdict."""
    spec = req.spec
    if (reason := policy.poisoned(deliveries)) is not None:
        log.error("job %s chunk %d: %s; not run", req.job_id, req.chunk, reason)
        return [failed(item, reason, permanent=True) for item in req.items]
    if not res.serves(spec.sam, spec.clip):
        mismatch = ModelMismatchError(
            f"worker {res.hostname} serves sam={res.settings.sam} clip={res.settings.clip}, but the job asks for "
            f"sam={spec.sam} clip={spec.clip}: start a worker with SLIP_SAM={spec.sam} SLIP_CLIP={spec.clip}")
        return [failed(item, mismatch, permanent=False) for item in req.items]
    try:
        request = res.resolve(spec.params)
    except InputError as e:
        return [failed(item, e, permanent=True) for item in req.items]
    outcomes: list[ItemOutcome] = []
    ppb = req.points_per_batch or res.settings.points_per_batch
    try:
        for item in req.items:
            attempt = lambda p, item=item: process_item(res.store, res.pipeline(request, points_per_batch=p), spec, item)  # noqa: E731
            outcomes.append(policy.run_item(attempt, item, points_per_batch=ppb))
    except SoftTimeLimitExceeded:
        reason = f"time limit: the task ran past {res.settings.soft_time_limit_s} s (SLIP_TASK_TIME_LIMIT)"
        done = {o.index for o in outcomes}
        outcomes += [failed(item, reason, permanent=False) for item in req.items if item.index not in done]
    return outcomes


def _forget_running(res: WorkerResources, req: SegmentRequest) -> None:
    try:
        res.board.clear_running(req.job_id, req.chunk)
    except REDIS_ERRORS as e:
        log.warning("job %s chunk %d: cannot clear its running mark (%s); the reconciler will", req.job_id, req.chunk, e)


def _top_up(res: WorkerResources, job_id: str) -> None:
    """Send the job's next chunks now rather than at the next tick (best effort: the ticker repeats it)."""
    try:
        res.feeder.feed(job_id)
    except Exception as e:  # the ticker feeds the job within SLIP_TICK seconds anyway
        log.warning("job %s: top-up after a chunk failed (%s: %s); the ticker will feed it", job_id, type(e).__name__, e)
