"""Celery tasks: thin wrappers that hand plain functions the process's warm resources.

Failure policy of ``slip.segment`` (one task = K images):

* bad input (:class:`slip.errors.InputError`: corrupt, unsupported or oversized image, empty prompt,
  missing input) fails that image: ``error.json`` with the reason, no retry; the other images go on;
* transient trouble (:class:`slip.errors.TransientError`, a store or Redis blip, CUDA out of memory)
  retries the task with exponential backoff (images already written are skipped on the retry); out of
  memory retries with ``points_per_batch`` halved; after ``SLIP_MAX_RETRIES`` the images fail with
  ``permanent: false`` so ``slip retry`` can take them again;
* a poison message (one that killed its worker on every delivery) is counted in Redis at task start
  (``slip:deliveries:<task id>:<retry>``, INCR with a TTL); past ``SLIP_MAX_DELIVERIES`` its images
  fail with "poison: ..." and the message is acknowledged without running.

A task whose every image failed raises (state FAILURE, the reason in the task state); otherwise it
returns a :class:`worker.jobs.SegmentResponse` as JSON.
"""

from __future__ import annotations

import logging

import redis
import torch
from celery.exceptions import SoftTimeLimitExceeded

from slip.errors import (
    ConfigError,
    DeviceOutOfMemoryError,
    InputError,
    SlipError,
    StoreError,
    TransientError,
)
from worker.app import app
from worker.jobs import ItemRecord, SegmentRequest, SegmentResponse
from worker.ledger import load_manifest, reconcile
from worker.processing import existing_record, process_item, write_failure
from worker.resources import WorkerResources

log = logging.getLogger("slip.worker")

REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


class _Retry(Exception):
    """Internal: a transient failure; carries the (possibly changed) request for the retry."""

    def __init__(self, cause: Exception, request: SegmentRequest) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.request = request


@app.task(name="slip.segment", bind=True, throws=(InputError,))
def segment(self, request: dict) -> dict:
    """Segment the K images of ``request`` (a :class:`SegmentRequest` as JSON); see the module doc."""
    res = self.app.slip_resources.get()
    req = SegmentRequest.parse(request)
    try:
        response = run_segment(res, req, task_id=self.request.id, retries=self.request.retries,
                               worker=self.request.hostname or res.hostname)
    except _Retry as r:
        return _retry_or_give_up(self, res, r)
    return _finish(response)


@app.task(name="slip.health", bind=True)
def health(self) -> dict:
    """What this worker process has loaded (specs, device, dtype, memory), its pid and host."""
    report = self.app.slip_resources.get().health()
    report["queues"] = sorted(self.app.amqp.queues.consume_from)
    report["worker"] = self.request.hostname
    return report


@app.task(name="slip.reconcile", bind=True)
def reconcile_job(self, job_id: str) -> dict:
    """Counts by state of a job, reconciled from its manifest, the store and the task states."""
    res = self.app.slip_resources.get()
    return reconcile(res.store, self.app, load_manifest(res.store, job_id)).summary()


# --- plain functions ------------------------------------------------------------------------------


def run_segment(res: WorkerResources, req: SegmentRequest, *, task_id: str, retries: int, worker: str) -> SegmentResponse:
    """Process every image of ``req``; raises :class:`_Retry` on transient trouble."""
    spec = req.spec
    common = {"task_id": task_id, "worker": worker}
    try:
        deliveries = count_delivery(res, task_id, retries)
    except REDIS_ERRORS as e:
        raise _Retry(TransientError(f"Redis unreachable while counting deliveries: {e}"), req) from e
    if deliveries > res.settings.max_deliveries:
        reason = f"poison: killed its worker {deliveries - 1} times (SLIP_MAX_DELIVERIES={res.settings.max_deliveries})"
        log.error("task %s: %s; acknowledged without running", task_id, reason)
        records = [existing_record(res.store, spec, item)
                   or write_failure(res.store, spec, item, reason=reason, error="PoisonMessage", permanent=False, **common)
                   for item in req.items]
        return SegmentResponse(job_id=req.job_id, task_id=task_id, worker=worker, items=records)
    mismatch = model_mismatch(res, spec)
    records: list[ItemRecord] = []
    for item in req.items:
        try:
            if mismatch:
                raise ConfigError(mismatch)
            records.append(process_item(res, spec, item, points_per_batch=req.points_per_batch))
        except InputError as e:
            log.info("task %s: %s failed: %s", task_id, item.name or item.image_key, e)
            permanent = not isinstance(e, ConfigError)  # a model mismatch is fixed by another worker
            records.append(write_failure(res.store, spec, item, reason=str(e), error=type(e).__name__, permanent=permanent, **common))
        except torch.OutOfMemoryError as e:
            _free_device_memory()
            smaller = max(1, (req.points_per_batch or res.settings.points_per_batch) // 2)
            oom = DeviceOutOfMemoryError(f"out of device memory; retrying with points_per_batch={smaller}")
            raise _Retry(oom, req.model_copy(update={"points_per_batch": smaller})) from e
        except (TransientError, StoreError, *REDIS_ERRORS) as e:
            raise _Retry(e, req) from e
        except SoftTimeLimitExceeded:
            reason = f"time limit: the task ran past {res.settings.soft_time_limit_s} s (SLIP_TASK_TIME_LIMIT)"
            _fail_unfinished(res, req, records, reason, "TimeLimitExceeded", common)
            raise
        except Exception as e:
            reason = f"internal error: {type(e).__name__}: {e}"
            records.append(write_failure(res.store, spec, item, reason=reason, error=type(e).__name__, permanent=False, **common))
            raise
    clear_deliveries(res, task_id, retries)
    return SegmentResponse(job_id=req.job_id, task_id=task_id, worker=worker, items=records)


def count_delivery(res: WorkerResources, task_id: str, retries: int) -> int:
    """How many times this message (task id + retry number) has started; counted in Redis."""
    key = _delivery_key(task_id, retries)
    ttl = max(86400, res.settings.visibility_timeout_s * (res.settings.max_deliveries + 2))
    pipe = res.redis.pipeline()
    pipe.incr(key)
    pipe.expire(key, ttl)
    count, _ = pipe.execute()
    return int(count)


def clear_deliveries(res: WorkerResources, task_id: str, retries: int) -> None:
    try:
        res.redis.delete(_delivery_key(task_id, retries))
    except REDIS_ERRORS as e:  # the counter expires on its own; the result is already written
        log.warning("could not clear delivery counter of %s: %s", task_id, e)


def model_mismatch(res: WorkerResources, spec) -> str | None:
    """Why this worker cannot serve ``spec``'s models, or None."""
    if res.settings.sam == spec.sam and res.settings.clip == spec.clip:
        return None
    return (f"worker {res.hostname} serves sam={res.settings.sam} clip={res.settings.clip}, but the job asks "
            f"for sam={spec.sam} clip={spec.clip}: start a worker with SLIP_SAM={spec.sam} SLIP_CLIP={spec.clip}, "
            f"then `slip retry JOB`")


def _delivery_key(task_id: str, retries: int) -> str:
    return f"slip:deliveries:{task_id}:{retries}"


def _retry_or_give_up(task, res: WorkerResources, r: _Retry) -> dict:
    retries = task.request.retries
    if retries < res.settings.max_retries:
        countdown = res.settings.retry_backoff_s * (2**retries)
        log.warning("task %s: %s; retry %d/%d in %.1f s", task.request.id, r.cause, retries + 1, res.settings.max_retries, countdown)
        items = r.request.items
        raise task.retry(exc=r.cause, countdown=countdown, max_retries=res.settings.max_retries,
                         kwargs={"request": r.request.model_dump(mode="json")},
                         kwargsrepr=f"job={r.request.job_id} items={items[0].index}..{items[-1].index} ({len(items)}) "
                                    f"retry={retries + 1} points_per_batch={r.request.points_per_batch}")
    reason = f"gave up after {retries} retries: {type(r.cause).__name__}: {r.cause}"
    records: list[ItemRecord] = []
    _fail_unfinished(res, r.request, records, reason, type(r.cause).__name__,
                     {"task_id": task.request.id, "worker": task.request.hostname or res.hostname})
    response = SegmentResponse(job_id=r.request.job_id, task_id=task.request.id, worker=res.hostname, items=records)
    return _finish(response)


def _fail_unfinished(res, req: SegmentRequest, records: list[ItemRecord], reason: str, error: str, common: dict) -> None:
    finished = {r.index for r in records}
    for item in req.items:
        if item.index not in finished:
            records.append(existing_record(res.store, req.spec, item)
                           or write_failure(res.store, req.spec, item, reason=reason, error=error, permanent=False, **common))


def _finish(response: SegmentResponse) -> dict:
    """The JSON result; raises when every image failed, so the task state says FAILURE and why."""
    failed = [r for r in response.items if r.status == "failed"]
    if response.items and len(failed) == len(response.items):
        reasons = "; ".join(f"item {r.index}: {r.reason}" for r in failed)
        if _all_input_errors(failed):
            raise InputError(reasons)
        raise SlipError(reasons)
    return response.model_dump(mode="json")


def _all_input_errors(records: list[ItemRecord]) -> bool:
    from slip import errors

    classes = [getattr(errors, r.error or "", None) for r in records]
    return all(isinstance(c, type) and issubclass(c, InputError) for c in classes)


def _free_device_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
