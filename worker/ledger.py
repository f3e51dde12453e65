"""The job ledger: a job's manifest in the store, reconciled with the store's results and Redis.

State of an item (``slip status``):

* ``done`` — ``results/.../segments.json`` exists;
* ``failed`` — ``results/.../error.json`` exists (its ``permanent`` flag says whether a retry can help);
* ``pending`` — its latest task is queued or running (``SENT``, ``RECEIVED``, ``STARTED``, ``RETRY``);
* ``lost`` — none of the above: never enqueued (producer crashed), or its task ended or expired
  without writing a result. ``slip retry`` re-enqueues lost items and non-permanent failures.

The store is the truth; Redis task states only tell pending from lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

from celery import Celery

from slip.errors import ObjectNotFoundError, StoreError
from worker.jobs import JOB_ID, JobManifest, TaskRecord, parse_model
from worker.store import ERROR_FILE, RESULT_FILE, Store, job_prefix

IN_FLIGHT = {"SENT", "RECEIVED", "STARTED", "RETRY"}  # Celery states of queued / running tasks
STATES = ("done", "failed", "pending", "lost")
SENT = "SENT"  # state the producer stores before publishing, so PENDING can mean "unknown"


@dataclass(frozen=True)
class ItemState:
    """Where one image of a job stands."""

    index: int
    name: str
    image_key: str
    result_key: str
    state: str  # done | failed | pending | lost
    task_id: Optional[str] = None  # latest task that carried it
    reason: Optional[str] = None  # failure reason (failed) or why it counts as lost
    error: Optional[str] = None  # failure class name
    permanent: bool = False  # a failure that a retry cannot fix (bad input)


@dataclass(frozen=True)
class JobStatus:
    """A job's items and their states."""

    manifest: JobManifest
    items: tuple[ItemState, ...]

    @property
    def counts(self) -> dict[str, int]:
        counts = {s: 0 for s in STATES}
        for item in self.items:
            counts[item.state] += 1
        return counts

    @property
    def finished(self) -> bool:
        return self.counts["pending"] == 0

    def summary(self) -> dict:
        return {"job_id": self.manifest.job_id, "total": len(self.items), **self.counts}


def manifest_key(job_id: str) -> str:
    if not JOB_ID.fullmatch(job_id or ""):
        from slip.errors import InvalidKeyError

        raise InvalidKeyError(f"{job_id!r} is not a job id (letters, digits, '-' and '_')")
    return f"{job_prefix(job_id)}/manifest.json"


def load_manifest(store: Store, job_id: str) -> JobManifest:
    """The job's manifest; ObjectNotFoundError naming the store when there is none."""
    key = manifest_key(job_id)
    try:
        data = store.get_json(key)
    except ObjectNotFoundError as e:
        raise ObjectNotFoundError(f"no job {job_id!r} in store {store.url} ({key} is missing)") from e
    return parse_model(JobManifest, data)


def task_records(store: Store, job_id: str) -> list[TaskRecord]:
    """Every task enqueued for the job, oldest first."""
    records = [parse_model(TaskRecord, store.get_json(k)) for k in store.list(f"{job_prefix(job_id)}/tasks")]
    return sorted(records, key=lambda r: (r.attempt, r.enqueued))


def task_states(app: Celery, task_ids: Iterable[str]) -> dict[str, str]:
    """Celery state of each task id (``PENDING`` = unknown to the backend), in one round trip."""
    ids = list(dict.fromkeys(task_ids))
    if not ids:
        return {}
    backend = app.backend
    values = backend.mget([backend.get_key_for_task(t) for t in ids])
    states = {}
    for task_id, value in zip(ids, values):
        states[task_id] = "PENDING" if value is None else backend.decode_result(value)["status"]
    return states


def reconcile(store: Store, app: Celery, manifest: JobManifest) -> JobStatus:
    """Every item's state, from the store first and Redis second."""
    latest: dict[int, str] = {}
    for record in task_records(store, manifest.job_id):
        for index in record.items:
            latest[index] = record.task_id
    states = task_states(app, latest.values())
    spec = manifest.spec
    items = []
    for item in manifest.items:
        prefix = spec.result_key(item)
        task_id = latest.get(item.index)
        base = {"index": item.index, "name": item.name, "image_key": item.image_key, "result_key": prefix, "task_id": task_id}
        if store.exists(f"{prefix}/{RESULT_FILE}"):
            items.append(ItemState(state="done", **base))
        elif store.exists(f"{prefix}/{ERROR_FILE}"):
            items.append(_failed(store, f"{prefix}/{ERROR_FILE}", base))
        elif task_id is not None and states.get(task_id) in IN_FLIGHT:
            items.append(ItemState(state="pending", **base))
        else:
            why = "never enqueued" if task_id is None else f"task {task_id} is {states.get(task_id)} without a result"
            items.append(ItemState(state="lost", reason=why, **base))
    return JobStatus(manifest=manifest, items=tuple(items))


def _failed(store: Store, key: str, base: dict) -> ItemState:
    try:
        doc = store.get_json(key)
    except StoreError as e:
        return ItemState(state="failed", reason=f"unreadable {ERROR_FILE}: {e}", **base)
    return ItemState(
        state="failed",
        reason=doc.get("reason"),
        error=doc.get("error"),
        permanent=bool(doc.get("permanent")),
        **base,
    )
