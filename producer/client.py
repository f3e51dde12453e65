"""The queue's Python client: submit images, follow a job, collect results, retry what was lost.

>>> client = QueueClient(Settings.from_env(os.environ))
>>> job = client.submit_segment(["photos/"], ["a red car"])
>>> client.wait(job); client.results(job, format="coco")

``submit_segment`` uploads each image into the store once (content-addressed), writes the job's
manifest (the ledger), then enqueues tasks of K images while keeping at most M tasks outstanding
(backpressure: 100k images never sit in Redis at once). Images whose result is already in the store are
not enqueued, so re-running a submit after a crash loses nothing and redoes nothing.
"""

from __future__ import annotations

import glob
import secrets
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Sequence

import redis
from celery import Celery
from celery.utils.nodenames import worker_direct
from kombu.exceptions import OperationalError

from slip.errors import InputError, TransientError
from worker.app import create_app
from worker.jobs import Item, JobManifest, SegmentParams, SegmentRequest, SegmentSpec, TaskRecord
from worker.ledger import IN_FLIGHT, SENT, JobStatus, load_manifest, reconcile, task_records, task_states
from worker.settings import Settings
from worker.store import ERROR_FILE, RESULT_FILE, IMAGE_EXTENSIONS, Store, input_key, job_prefix, sha256_bytes
from producer.export import coco_document, jsonl_records

GLOB_CHARS = set("*?[")
DEFAULT_BATCH = 4  # K: images per task
DEFAULT_IN_FLIGHT = 32  # M: tasks outstanding at once
Progress = Callable[[dict], None]  # called with {"total", "done", "failed", "pending", "lost", "queued"}


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files from files, directories (recursive, image extensions only) and glob patterns, in order."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and _is_image_name(p) and not _hidden(p, path))
        elif GLOB_CHARS & set(str(raw)):
            files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        else:
            raise InputError(f"no such file or directory: {raw}")
        if not files:
            raise InputError(f"no images found in {raw} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
        found.extend(files)
    return list(dict.fromkeys(p.resolve() for p in found))


def new_job_id() -> str:
    """``YYYYmmdd-HHMMSS-xxxxxx``: sortable by time, unique by its random tail."""
    return f"{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class QueueClient:
    """Talks to Redis (Celery) and the object store on behalf of a producer."""

    def __init__(self, settings: Settings, *, app: Celery | None = None, store: Store | None = None) -> None:
        self.settings = settings
        self.app = app or create_app(settings)
        self.store = store or Store(settings.store)

    # --- connectivity -------------------------------------------------------------------------------

    def check_broker(self, timeout_s: float = 3.0) -> None:
        """TransientError with a how-to when Redis does not answer."""
        client = redis.Redis.from_url(self.settings.broker_url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        try:
            client.ping()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as e:
            raise TransientError(
                f"cannot reach Redis at {self.settings.broker_url}: start it with "
                f"`redis-server --daemonize yes` (or `bash scripts/setup.sh`), or point SLIP_BROKER_URL at it"
            ) from e
        finally:
            client.close()

    def health(self, worker: str | None = None, *, timeout_s: float = 30.0) -> dict:
        """The health report of one worker (by node name, e.g. ``w1@host``) or of whichever answers."""
        options = {"queue": worker_direct(worker)} if worker else {}
        result = self.app.send_task("slip.health", **options)
        try:
            return result.get(timeout=timeout_s)
        finally:
            result.forget()

    # --- submit ---------------------------------------------------------------------------------------

    def upload(self, paths: Sequence[Path]) -> list[Item]:
        """Store each file under ``inputs/<sha256>.<ext>`` (skipped when already there)."""
        items = []
        for index, path in enumerate(paths):
            try:
                data = path.read_bytes()
            except OSError as e:
                raise InputError(f"cannot read {path}: {e.strerror or e}") from e
            sha = sha256_bytes(data)
            key = input_key(sha, path.suffix)
            if not self.store.exists(key):
                self.store.put_bytes(key, data)
            items.append(Item(index=index, image_key=key, image_sha=sha, name=str(path)))
        return items

    def create_job(
        self, paths: Iterable[str | Path], prompts: Sequence[str], params: SegmentParams | dict | None = None,
        *, sam: str | None = None, clip: str | None = None, batch_size: int = DEFAULT_BATCH,
    ) -> JobManifest:
        """Validate, upload and write the manifest; nothing is enqueued yet."""
        params = params if isinstance(params, SegmentParams) else SegmentParams.model_validate(params or {})
        spec = SegmentSpec(prompts=prompts, sam=sam or self.settings.sam, clip=clip or self.settings.clip, params=params)
        items = self.upload(expand_paths(paths))
        manifest = JobManifest(job_id=new_job_id(), created=utc_now(), spec=spec, batch_size=batch_size, items=tuple(items))
        self.store.put_json(f"{job_prefix(manifest.job_id)}/manifest.json", manifest.model_dump(mode="json"))
        return manifest

    def submit_segment(
        self, paths: Iterable[str | Path], prompts: Sequence[str], params: SegmentParams | dict | None = None,
        *, sam: str | None = None, clip: str | None = None, batch_size: int = DEFAULT_BATCH,
        max_in_flight: int = DEFAULT_IN_FLIGHT, on_job: Callable[[str], None] | None = None,
        on_progress: Progress | None = None,
    ) -> str:
        """Submit a segment job and return its id once every image is enqueued (or already done)."""
        self.check_broker()
        manifest = self.create_job(paths, prompts, params, sam=sam, clip=clip, batch_size=batch_size)
        if on_job:
            on_job(manifest.job_id)
        todo = [item for item in manifest.items if not self._done(manifest, item)]
        self.enqueue(manifest, todo, attempt=0, max_in_flight=max_in_flight, on_progress=on_progress)
        return manifest.job_id

    def enqueue(
        self, manifest: JobManifest, items: Sequence[Item], *, attempt: int, max_in_flight: int = DEFAULT_IN_FLIGHT,
        on_progress: Progress | None = None,
    ) -> int:
        """Send ``items`` in tasks of ``manifest.batch_size``, at most ``max_in_flight`` outstanding."""
        if max_in_flight < 1:
            raise InputError(f"max in-flight tasks must be at least 1, got {max_in_flight}")
        outstanding: list[str] = []
        finished = len(manifest.items) - len(items)
        sizes: dict[str, int] = {}
        for start in range(0, len(items), manifest.batch_size):
            while len(outstanding) >= max_in_flight:
                states = task_states(self.app, outstanding)
                still = [t for t in outstanding if states[t] in IN_FLIGHT]
                finished += sum(sizes.pop(t) for t in outstanding if t not in still)
                outstanding = still
                if on_progress:
                    on_progress({"total": len(manifest.items), "finished": finished, "queued": start})
                if len(outstanding) >= max_in_flight:
                    time.sleep(0.2)
            chunk = items[start : start + manifest.batch_size]
            task_id = self._send(manifest, chunk, attempt)
            outstanding.append(task_id)
            sizes[task_id] = len(chunk)
        return len(items)

    def _send(self, manifest: JobManifest, chunk: Sequence[Item], attempt: int) -> str:
        """Ledger first (SENT state + task record), then the message: a crash in between is 'lost'."""
        task_id = str(uuid.uuid4())
        request = SegmentRequest(job_id=manifest.job_id, items=tuple(chunk), spec=manifest.spec)
        record = TaskRecord(task_id=task_id, items=[i.index for i in chunk], attempt=attempt, enqueued=utc_now())
        try:
            self.app.backend.store_result(task_id, None, SENT)
            self.store.put_json(f"{job_prefix(manifest.job_id)}/tasks/{task_id}.json", record.model_dump(mode="json"))
            self.app.send_task(
                "slip.segment",
                kwargs={"request": request.model_dump(mode="json")},
                task_id=task_id,
                kwargsrepr=_describe(manifest, chunk),
                retry=True,
                retry_policy={"max_retries": 3, "interval_start": 0.5, "interval_step": 1.0},
            )
        except (OperationalError, redis.exceptions.ConnectionError) as e:
            raise TransientError(
                f"lost Redis at {self.settings.broker_url} while enqueueing job {manifest.job_id}: {e}; "
                f"run `slip retry {manifest.job_id}` once it is back"
            ) from e
        return task_id

    def _done(self, manifest: JobManifest, item: Item) -> bool:
        """True when the item's result exists; a stale error.json is cleared so the item runs again."""
        prefix = manifest.spec.result_key(item)
        if self.store.exists(f"{prefix}/{RESULT_FILE}"):
            return True
        self.store.delete(f"{prefix}/{ERROR_FILE}")
        return False

    # --- follow ---------------------------------------------------------------------------------------

    def status(self, job_id: str) -> JobStatus:
        """Every item's state, reconciled from the manifest, the store and Redis."""
        return reconcile(self.store, self.app, load_manifest(self.store, job_id))

    def wait(self, job_id: str, *, timeout_s: float | None = None, on_progress: Progress | None = None) -> JobStatus:
        """Poll :meth:`status` until nothing is pending (or ``timeout_s`` passes); the last status."""
        start = time.monotonic()
        while True:
            t0 = time.monotonic()
            status = self.status(job_id)
            if on_progress:
                on_progress({"total": len(status.items), **status.counts})
            if status.finished or (timeout_s is not None and time.monotonic() - start > timeout_s):
                return status
            time.sleep(max(0.25, 2 * (time.monotonic() - t0)))  # slower polls for huge jobs

    def retry(self, job_id: str, *, max_in_flight: int = DEFAULT_IN_FLIGHT) -> int:
        """Re-enqueue lost items and non-permanent failures; returns how many."""
        self.check_broker()
        status = self.status(job_id)
        manifest = status.manifest
        picked = {s.index for s in status.items if s.state == "lost" or (s.state == "failed" and not s.permanent)}
        items = [item for item in manifest.items if item.index in picked]
        for item in items:
            self.store.delete(f"{manifest.spec.result_key(item)}/{ERROR_FILE}")
        attempt = 1 + max((r.attempt for r in task_records(self.store, job_id)), default=0)
        return self.enqueue(manifest, items, attempt=attempt, max_in_flight=max_in_flight)

    # --- results --------------------------------------------------------------------------------------

    def results(self, job_id: str, *, format: str = "jsonl") -> str:
        """``jsonl``: one JSON record per image; ``coco``: a COCO annotation file for the whole job."""
        status = self.status(job_id)
        if format == "jsonl":
            return jsonl_records(self.store, status)
        if format == "coco":
            import json

            return json.dumps(coco_document(self.store, status))
        raise InputError(f"unknown results format {format!r}: use jsonl or coco")


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _describe(manifest: JobManifest, chunk: Sequence[Item]) -> str:
    """Short task description for Flower (the full payload stays in the message)."""
    prompts = ", ".join(manifest.spec.prompts)
    prompts = prompts if len(prompts) <= 60 else prompts[:57] + "..."
    return f"job={manifest.job_id} items={chunk[0].index}..{chunk[-1].index} ({len(chunk)}) prompts=[{prompts}]"
