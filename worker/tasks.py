"""The chunk task: one function runs one chunk ``(job, chunk, attempt)`` of a job of any kind.

It holds the chunk (its running mark; a stale delivery — the chunk finished, or a later attempt was sent —
is acknowledged without work), reads the chunk's units from the manifest pages, runs each under the
failure policy (:mod:`worker.policy`), writes the completion record, marks the chunk finished (or sends it
once more when units failed for now and attempts are left) and tops the job up. An attempt past
``SLIP_MAX_ATTEMPTS`` is not run: poison. It returns the done and failed counts (shown by Flower).
"""

from __future__ import annotations

import logging
import os
import time

from celery.exceptions import SoftTimeLimitExceeded

from jobs.broker import task_id as message_id
from jobs.errors import REDIS_ERRORS, BrokerError
from jobs.ledger import record_chunk
from jobs.model import ChunkRecord, Item, ItemOutcome, JobManifest
from jobs.reaper import mark_json
from jobs.view import summarize
from slip.timing import utc_now
from worker.policy import failed, run_unit
from worker.processing import segment_unit
from worker.resources import WorkerResources
from worker.train_sam_task import train_sam_unit
from worker.train_tasks import evaluate_unit, train_unit

log = logging.getLogger("slip.worker")
PROCESSORS = {"segment": segment_unit, "train": train_unit, "evaluate": evaluate_unit, "train-sam": train_sam_unit}


def run(task, job: str, chunk: int, attempt: int = 0) -> dict:
    """Run ``attempt`` of ``chunk`` of ``job`` (see the module docstring)."""
    res = task.app.slip_resources.get()
    progress = None if task.ignore_result else (lambda meta: task.update_state(state="PROGRESS", meta=meta))
    return run_chunk(res, job, chunk, attempt, task_id=task.request.id or message_id(job, chunk, attempt),
                     node=task.request.hostname or res.hostname, progress=progress)


def run_chunk(res: WorkerResources, job_id: str, chunk: int, attempt: int, *, task_id: str, node: str,
              progress=None, processors: dict = PROCESSORS) -> dict:
    """Hold, run, record and finish one chunk; its summary (``stale`` when there was nothing to do).
    ``processors``: kind -> unit function (the bulk bench runs a stand-in with no model work)."""
    summary = {"job": job_id, "chunk": chunk, "attempt": attempt}
    mark = mark_json({"attempt": attempt, "worker": res.instance, "pid": os.getpid(), "node": node, "at": time.time()})
    if not res.board.begin(job_id, chunk, attempt, mark):
        return {**summary, "stale": True}
    manifest = None
    try:
        manifest = res.manifest(job_id)
        if attempt >= res.settings.max_attempts:
            reason = (f"poison: sent {attempt} times, never finished (its worker died each time, or its message was "
                      f"lost; SLIP_MAX_ATTEMPTS={res.settings.max_attempts})")
            outcomes = [failed(Item(index=i), reason, permanent=True, name="Poison") for i in manifest.chunk_range(chunk)]
        else:
            process = processors[manifest.kind]
            outcomes = _outcomes(res, manifest, res.items(manifest, chunk), process, node=node, progress=progress)
        record = ChunkRecord(job_id=job_id, chunk=chunk, attempt=attempt, task_id=task_id, worker=node,
                             finished=utc_now(), items=outcomes)
        record_chunk(res.store, record, replace_earlier=attempt > 0)
        letters = record.letters
        again = "t" in letters and attempt + 1 < res.settings.max_attempts
        state = res.board.finish(job_id, chunk, attempt, mark, again=again, done=letters.count("d"),
                                 failed=len(letters) - letters.count("d"))
    except BaseException:
        _give_back(res, manifest, job_id, chunk, mark)
        raise
    res.count(len(letters))
    if state == -2:  # some units failed for now: once more, behind the job's waiting chunks
        log.warning("job %s chunk %d: sending again (attempt %d): %d unit(s) failed for now", job_id, chunk,
                    attempt + 1, letters.count("t"))
        res.send(manifest.kind, job_id, chunk, attempt + 1, again=False)
    elif state == 1:
        _close(res, job_id)
    _top_up(res, manifest.kind, job_id)
    return {**summary, "done": letters.count("d"), "failed": len(letters) - letters.count("d"), "letters": letters}


def _outcomes(res: WorkerResources, manifest: JobManifest, items: list[Item], process, *, node: str,
              progress) -> list[ItemOutcome]:
    """Each unit's outcome under the policy; the units the soft time limit cut off fail for now."""
    outcomes = []
    try:
        for item in items:
            unit = lambda ppb, item=item: process(res, manifest, item, points_per_batch=ppb, node=node, progress=progress)  # noqa: E731
            outcomes.append(run_unit(unit, item, points_per_batch=res.settings.models.points_per_batch))
    except SoftTimeLimitExceeded:
        reason = f"time limit: the task ran past {res.settings.soft_time_limit_s} s (SLIP_TASK_TIME_LIMIT)"
        outcomes += [failed(item, reason, permanent=False, name="TimeLimit") for item in items[len(outcomes):]]
    return outcomes


def _give_back(res: WorkerResources, manifest: JobManifest | None, job_id: str, chunk: int, mark: str) -> None:
    """The chunk could not be run to its end (the store or Redis away past their retries): sent again (an
    attempt more), or only let go when its job could not be read."""
    try:
        if manifest is None:
            res.board.release(job_id, chunk, mark)
        elif (attempt := res.board.reclaim(job_id, chunk, mark)) is not None:
            log.warning("job %s chunk %d: sending again (attempt %d): its run failed", job_id, chunk, attempt)
            res.send(manifest.kind, job_id, chunk, attempt, again=False)
    except (*REDIS_ERRORS, BrokerError) as e:
        log.warning("job %s chunk %d: cannot give it back (%s); a reaper takes it back later", job_id, chunk, e)


def _close(res: WorkerResources, job_id: str) -> None:
    """The job's last chunk finished: close it in Redis and cache its summary in the store."""
    res.board.close(job_id, keep_s=res.settings.result_expires_s)
    log.info("job %s finished", job_id)
    try:
        summarize(res.board, res.store, job_id, dead_after_s=res.settings.dead_after_s)
    except Exception as e:  # a cache: readers write it when it is missing
        log.warning("job %s: cannot write its summary (%s: %s)", job_id, type(e).__name__, e)


def _top_up(res: WorkerResources, kind: str, job_id: str) -> None:
    """Send the job's next chunks now rather than at the next beat (best effort: the reaper repeats it)."""
    try:
        for chunk in res.board.claim(job_id):
            res.send(kind, job_id, chunk, 0, again=False)
    except Exception as e:  # the reaper tops the job up within a beat anyway
        log.warning("job %s: top-up after a chunk failed (%s: %s); the reaper will", job_id, type(e).__name__, e)
