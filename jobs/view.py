"""The read side, for `slip jobs`, the dashboard and metrics: jobs of every kind, their failures grouped by
reason, the workers, the queue depths. Plain dataclasses with ``to_json()``; no model code.

Costs: :func:`list_jobs` is two Redis round trips and no store request for the jobs Redis knows (their
counters live in ``slip:job:<id>``); a job Redis no longer knows costs one GET (its ``summary.json``, cached
when it finished) or, without one, a manifest GET and a listing. :func:`workers` is one Redis round trip.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from jobs.board import Board
from jobs.errors import ObjectNotFoundError
from jobs.ledger import load_manifest, summary_key
from jobs.model import UNITS, JOB_ID
from jobs.status import FailureGroup, JobView, chunk_listing, failure_groups, job_status, read_status
from jobs.store import Store


@dataclass(frozen=True)
class JobRow:
    """One job of the list (units: images, cells, tasks or runs, by kind)."""

    job_id: str
    kind: str  # segment | train | evaluate | train-sam
    state: str  # active | finished | lost (Redis does not know it and it did not finish)
    unit: str  # what one unit is: image | cell | task | run
    total: int
    done: int
    failed: int
    running: int  # units a live worker holds now
    queued: int  # units sent, waiting for a worker
    waiting: int  # units not sent yet
    in_flight: int  # chunks sent and not finished
    rate: float | None  # units per second, over the job's run so far
    eta_s: float | None  # seconds until the rest is finished at that rate
    age_s: float  # since the job was created
    created: str  # ISO 8601 UTC
    finished: str | None  # ISO 8601 UTC

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class WorkerRow:
    """One worker: its heartbeat, what it holds now, how fast it goes."""

    node: str  # the Celery node name (name@host)
    instance: str  # this run of it (a restart is a new instance)
    host: str
    heartbeat_age_s: float
    alive: bool  # beat within SLIP_DEAD_AFTER
    job: str | None  # the job and chunk it holds now
    chunk: int | None
    units: int  # units finished since it started
    rate: float  # units per second over the last minute
    serves: dict | None = None  # {"engine", "sam", "clip"} of a worker on the gpu queue; None for a cpu-only one

    def to_json(self) -> dict:
        return asdict(self)


def list_jobs(board: Board, store: Store, *, dead_after_s: float, state: str | None = None, kind: str | None = None,
              limit: int = 100) -> list[JobRow]:
    """The newest ``limit`` jobs (active first), optionally of one ``state`` and ``kind``. When Redis knows no
    job at all (it lost its data), the store's ``jobs/`` listing stands in."""
    ids = registry(board, limit)
    now = time.time()
    rows = [job_row(j, v, dead_after_s=dead_after_s, now=now) for j, v in zip(ids, board.views(ids)) if v.head]
    if not ids:
        rows = [row for j in reversed(store.children("jobs")[-limit:]) if JOB_ID.fullmatch(j)
                and (row := stored_row(board, store, j, dead_after_s=dead_after_s)) is not None]
    return [r for r in rows if (state is None or r.state == state) and (kind is None or r.kind == kind)]


def job(board: Board, store: Store, job_id: str, *, dead_after_s: float) -> JobRow:
    """One job's row (ObjectNotFoundError when neither Redis nor the store knows it)."""
    view = board.view(job_id)
    row = job_row(job_id, view, dead_after_s=dead_after_s) if view.head else stored_row(board, store, job_id,
                                                                                        dead_after_s=dead_after_s)
    if row is None:
        raise ObjectNotFoundError(f"no job {job_id!r} in Redis or in store {store.url}")
    return row


def job_row(job_id: str, view: JobView, *, dead_after_s: float, now: float | None = None) -> JobRow:
    """A job's row from Redis alone (its counters and running marks)."""
    now, head = time.time() if now is None else now, view.head
    total, chunks = int(head.get("total", 0)), int(head.get("chunks", 1))
    batch = -(-total // max(1, chunks))
    size = lambda c: max(0, min(batch, total - c * batch))  # noqa: E731
    finished_chunks = int.from_bytes(view.done, "big").bit_count()
    live = view.live(dead_after_s, now)
    in_flight = [c for c in range(view.next) if not view.finished(c)] if view.active else []
    done, failed = int(head.get("done", 0)), int(head.get("failed", 0))
    running = sum(size(c) for c in live)
    queued = sum(size(c) for c in in_flight if c not in live)
    created, started, ended = (float(head[k]) if head.get(k) else None for k in ("created", "started", "finished"))
    rate = (done + failed) / ((ended or now) - started) if started and (ended or now) > started else None
    rest = total - done - failed
    return JobRow(job_id=job_id, kind=head.get("kind", "segment"), state=head.get("state", "lost"),
                  unit=UNITS.get(head.get("kind", "segment"), "unit"), total=total, done=done, failed=failed,
                  running=running, queued=queued, waiting=max(0, rest - running - queued) if view.active else 0,
                  in_flight=len(in_flight) if finished_chunks < chunks else 0, rate=rate,
                  eta_s=rest / rate if rate and view.active else None, age_s=now - (created or now),
                  created=_iso(created or now), finished=_iso(ended) if ended else None)


def stored_row(board: Board, store: Store, job_id: str, *, dead_after_s: float) -> JobRow | None:
    """A job's row from the store: its summary, or (unfinished) its manifest and listing; None without either."""
    try:
        return JobRow(**store.get_json(summary_key(job_id))["row"])
    except ObjectNotFoundError:
        pass
    try:
        status = read_status(board, store, job_id, dead_after_s=dead_after_s)
    except ObjectNotFoundError:
        return None
    created = datetime.fromisoformat(status.manifest.created).timestamp()
    c = status.counts
    return JobRow(job_id=job_id, kind=status.manifest.kind, state="finished" if c["lost"] == 0 else "lost",
                  unit=UNITS[status.manifest.kind], total=status.manifest.total, done=c["done"], failed=c["failed"],
                  running=0, queued=0, waiting=0, in_flight=0, rate=None, eta_s=None, age_s=time.time() - created,
                  created=status.manifest.created, finished=None)


def failures(board: Board, store: Store, job_id: str, *, dead_after_s: float, examples: int = 3) -> list[FailureGroup]:
    """The job's failed units grouped by reason (a finished job's come from its summary: one GET)."""
    try:
        return [FailureGroup(**{**g, "examples": [(e["index"], e["name"]) for e in g["examples"]]})
                for g in store.get_json(summary_key(job_id))["failures"]]
    except ObjectNotFoundError:
        status = read_status(board, store, job_id, dead_after_s=dead_after_s)
        return failure_groups(store, status, examples=examples)


def summarize(board: Board, store: Store, job_id: str, *, dead_after_s: float) -> dict:
    """Write ``jobs/<id>/summary.json`` for a finished job (its row and failure groups); the summary."""
    manifest, view = load_manifest(store, job_id), board.view(job_id)
    status = job_status(manifest, chunk_listing(store, job_id), view, dead_after_s=dead_after_s)
    row = job_row(job_id, view, dead_after_s=dead_after_s) if view.head else stored_row(board, store, job_id,
                                                                                        dead_after_s=dead_after_s)
    summary = {"row": {**row.to_json(), "done": status.counts["done"], "failed": status.counts["failed"]},
               "failures": [g.to_json() for g in failure_groups(store, status)]}
    store.put_json(summary_key(job_id), summary)
    return summary


def workers(board: Board, *, dead_after_s: float) -> list[WorkerRow]:
    """Every worker that beat within the last hour, with the chunk it holds now."""
    active = board.active()
    views, now = board.views(active), time.time()
    beats = {k.decode(): json.loads(v) for k, v in board.r.hgetall(f"{board.prefix}:workers").items()}
    holding = {m.get("worker"): (j, c) for j, v in zip(active, views) for c, m in v.running.items()}
    return [WorkerRow(node=b.get("node", ""), instance=i, host=b.get("host", ""), heartbeat_age_s=now - float(b["at"]),
                      alive=now - float(b["at"]) < dead_after_s, job=holding.get(i, (None, None))[0],
                      chunk=holding.get(i, (None, None))[1], units=int(b.get("units", 0)), rate=float(b.get("rate", 0)),
                      serves=b.get("serves"))
            for i, b in sorted(beats.items(), key=lambda kv: kv[1].get("node", ""))]


def registry(board: Board, limit: int) -> list[str]:
    """The newest ``limit`` jobs of ``slip:jobs``, newest first, and every active one (first)."""
    pipe = board.r.pipeline()
    pipe.zrevrange(f"{board.prefix}:jobs", 0, limit - 1)
    pipe.smembers(f"{board.prefix}:active")
    newest, active = pipe.execute()
    return list(dict.fromkeys(m.decode() for m in [*sorted(active, reverse=True), *newest]))


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")
