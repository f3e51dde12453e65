"""The queue's Python client: submit images and leave, follow a job, export results, re-run failures.

>>> client = QueueClient(Settings.from_env(os.environ))
>>> job = client.submit_segment(["photos/"], ["a red car"])   # returns once the cluster has the job
>>> client.wait(job); list(client.export_items(job))

``submit_segment`` uploads each image into the store once (content-addressed, so a re-run uploads only
what is missing), writes the job's manifest, registers the job with the cluster (Redis) and sends its
first chunks. From then on the workers feed the job themselves (:mod:`worker.feeder`): the producer
machine can be switched off. ``status`` reads one listing of the job's completion records plus one Redis
round trip, whatever the job's size.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import redis
import secrets

from slip.errors import BrokerError, InputError, StoreError
from slip.inputs import expand_paths, relative_names, submitted_root
from worker.board import REDIS_ERRORS, JobBoard, connect
from worker.broker import MODEL_QUEUE, holdings
from worker.feeder import Feeder
from worker.jobs import Item, JobManifest, SegmentParams, SegmentSpec, parse_model
from worker.ledger import (
    JobStatus,
    chunk_letters,
    chunk_records,
    iter_items,
    job_status,
    load_manifest,
    write_job,
)
from worker.settings import Settings
from worker.store import Store, input_key, sha256_bytes

DEFAULT_BATCH = 4  # K: images per task
DEFAULT_IN_FLIGHT = 32  # M: chunks in flight at once, per job
UPLOAD_THREADS = 8  # parallel uploads (object stores answer each PUT in tens of ms)
Progress = Callable[[JobStatus], None]


def new_job_id() -> str:
    """``YYYYmmdd-HHMMSS-xxxxxx``: sortable by time, unique by its random tail."""
    return f"{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class QueueClient:
    """Talks to Redis and the object store on behalf of a producer (keyword-only injections for tests)."""

    def __init__(self, settings: Settings, *, app=None, store: Store | None = None) -> None:
        from worker.app import create_app

        self.settings = settings
        self.app = app or create_app(settings)
        self.store = store or Store(settings.store)
        self.board = JobBoard(connect(settings.broker_url))
        self.feeder = Feeder(board=self.board, store=self.store, publish=self.app.slip_resources.publish,
                             settings=settings, broker=lambda: holdings(self.board.r, (MODEL_QUEUE,)))

    # --- connectivity -------------------------------------------------------------------------------

    def check_broker(self, timeout_s: float = 3.0) -> None:
        """BrokerError with a how-to when Redis does not answer."""
        client = redis.Redis.from_url(self.settings.broker_url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        try:
            client.ping()
        except (*REDIS_ERRORS, redis.exceptions.RedisError) as e:
            raise BrokerError(
                f"cannot reach Redis at {self.settings.broker_url}: start it with `redis-server --daemonize yes` "
                f"(or `bash scripts/setup.sh`), or point SLIP_BROKER_URL at it"
            ) from e
        finally:
            client.close()

    def health(self, worker: str | None = None, *, timeout_s: float = 30.0) -> dict:
        """The health report of one worker (by node name, e.g. ``w1@host``) or of whichever answers."""
        from celery.utils.nodenames import worker_direct

        options = {"queue": worker_direct(worker)} if worker else {"queue": "cpu"}
        result = self.app.send_task("slip.health", **options)
        try:
            return result.get(timeout=timeout_s)
        finally:
            result.forget()

    # --- submit ---------------------------------------------------------------------------------------

    def upload(self, paths: Sequence[Path]) -> list[Item]:
        """Store each file under ``inputs/<sha256>.<ext>`` (skipped when already there), in parallel; items
        named by their path relative to the submitted root."""
        names = relative_names(paths)
        with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
            keys = list(pool.map(self._upload_one, paths))
        return [Item(index=i, image_key=key, image_sha=sha, name=name)
                for i, ((key, sha), name) in enumerate(zip(keys, names))]

    def _upload_one(self, path: Path) -> tuple[str, str]:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise InputError(f"cannot read {path}: {e.strerror or e}") from e
        sha = sha256_bytes(data)
        key = input_key(sha, path.suffix)
        if not self.store.exists(key):
            self.store.put_bytes(key, data)
        return key, sha

    def create_job(
        self, paths: Iterable[str | Path], prompts: Sequence[str], params: SegmentParams | dict | None = None,
        *, sam: str | None = None, clip: str | None = None, batch_size: int = DEFAULT_BATCH,
    ) -> JobManifest:
        """Validate, upload and write the manifest (pages first); nothing is sent yet."""
        params = params if isinstance(params, SegmentParams) else parse_model(SegmentParams, params or {})
        spec = parse_model(SegmentSpec, {"prompts": list(prompts), "sam": sam or self.settings.sam,
                                         "clip": clip or self.settings.clip, "params": params})
        if not 1 <= batch_size <= 64:
            raise InputError(f"batch size must be between 1 and 64 images per task, got {batch_size}")
        files = expand_paths(paths)
        items = self.upload(files)
        manifest = JobManifest(job_id=new_job_id(), created=utc_now(), spec=spec, batch_size=batch_size,
                               total=len(items), page_size=JobManifest.page_size_for(batch_size),
                               root=str(submitted_root(files)))
        write_job(self.store, manifest, items)
        return manifest

    def submit_segment(
        self, paths: Iterable[str | Path], prompts: Sequence[str], params: SegmentParams | dict | None = None,
        *, sam: str | None = None, clip: str | None = None, batch_size: int = DEFAULT_BATCH,
        max_in_flight: int = DEFAULT_IN_FLIGHT, on_job: Callable[[str], None] | None = None,
    ) -> str:
        """Upload, write the manifest, hand the job to the cluster and send its first chunks; the job id.
        Returns without waiting: the workers keep ``max_in_flight`` chunks in flight until the job is done."""
        if max_in_flight < 1:
            raise InputError(f"max in-flight chunks must be at least 1, got {max_in_flight}")
        self.check_broker()
        manifest = self.create_job(paths, prompts, params, sam=sam, clip=clip, batch_size=batch_size)
        self.board.register(manifest.job_id, chunks=manifest.chunks, window=max_in_flight)
        self.feeder.feed(manifest.job_id)  # the first window now; the workers' ticker does the rest
        if on_job:
            on_job(manifest.job_id)  # only now: a printed id means the cluster has the job
        return manifest.job_id

    # --- follow ---------------------------------------------------------------------------------------

    def status(self, job_id: str) -> JobStatus:
        """Counts by state: one manifest read, one listing of the completion records, one Redis round trip."""
        manifest = load_manifest(self.store, job_id)
        view = self.board.view(job_id)  # first: a chunk that finishes before the listing is then seen done
        letters = chunk_letters(self.store, job_id)
        return job_status(manifest, letters, active=view.active, running=set(view.running),
                          sent=set(view.sent) | set(view.retry))

    def wait(self, job_id: str, *, timeout_s: float | None = None, on_progress: Progress | None = None,
             on_trouble: Callable[[Exception], None] | None = None, poll_s: float = 1.0) -> JobStatus:
        """Poll :meth:`status` until the job is finished (or ``timeout_s`` passes); rides out Redis and store
        outages (``on_trouble`` hears of each failed poll). Returns the last status read."""
        start, last = time.monotonic(), None
        while True:
            try:
                last = self.status(job_id)
                if on_progress:
                    on_progress(last)
                if last.finished:
                    return last
            except (BrokerError, StoreError, *REDIS_ERRORS) as e:
                if on_trouble:
                    on_trouble(e)
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                if last is None:
                    raise BrokerError(f"job {job_id}: no status could be read in {timeout_s} s (Redis or the store away)")
                return last
            time.sleep(poll_s)

    def failures(self, status: JobStatus, *, limit: int = 20) -> list[tuple[int, str, str]]:
        """``(index, name, reason)`` of up to ``limit`` failed images (reads their chunks' records only)."""
        chunks = [c for c, letters in sorted(status.letters.items()) if letters.strip("d")]
        found: list[tuple[int, str]] = []
        for record in chunk_records(self.store, status.manifest.job_id, chunks):
            found += [(o.index, o.reason or "") for o in record.items if o.state == "failed"]
            if len(found) >= limit:
                break
        names = self._names(status.manifest, {i for i, _ in found[:limit]})
        return [(i, names.get(i, ""), reason) for i, reason in found[:limit]]

    def retry(self, job_id: str, *, max_in_flight: int = DEFAULT_IN_FLIGHT) -> int:
        """Re-run the job's failed images on purpose, and hand the cluster back a job it lost (a Redis that lost
        its data): the finished chunks are marked finished, the rest are sent. How many images go again."""
        self.check_broker()
        status = self.status(job_id)
        failed = [c for c, letters in status.letters.items() if letters.strip("d")]
        lost = status.counts["lost"]
        if lost:  # re-register with what the store says is finished; the feeder sends everything else
            window = self.board.view(job_id).window if status.active else max_in_flight
            self.board.register(job_id, chunks=status.manifest.chunks, window=window)
            self.board.mark_done(job_id, [c for c in status.letters if c not in failed])
        if failed:
            self.board.register(job_id, chunks=status.manifest.chunks, window=self.board.view(job_id).window)
            self.board.reopen(job_id, failed)
        if failed or lost:
            self.feeder.feed(job_id)
        return lost + sum(len(status.letters[c].replace("d", "")) for c in failed)

    # --- results --------------------------------------------------------------------------------------

    def export_items(self, job_id: str):
        """Every image of the job as a ``producer.exports.ExportItem``, in index order, streamed (one manifest
        page and one completion record in memory at a time)."""
        from producer.exports import ExportItem

        manifest = load_manifest(self.store, job_id)
        outcomes = self._outcomes(job_id)
        for item in iter_items(self.store, manifest):
            outcome = outcomes.get(item.index)
            state = "pending" if outcome is None else outcome.state
            doc = self._result_doc(outcome.result_key) if state == "done" else None
            yield ExportItem(index=item.index, name=item.name, state=state, doc=doc,
                             reason=None if outcome is None else outcome.reason,
                             image=lambda key=item.image_key: self.store.get_bytes(key))

    def _outcomes(self, job_id: str) -> "_Outcomes":
        return _Outcomes(chunk_records(self.store, job_id))

    def _result_doc(self, prefix: str) -> dict:
        return self.store.get_json(f"{prefix}/segments.json")

    def _names(self, manifest: JobManifest, indices: set[int]) -> dict[int, str]:
        names = {}
        for item in iter_items(self.store, manifest):
            if item.index in indices:
                names[item.index] = item.name
                if len(names) == len(indices):
                    break
        return names


class _Outcomes:
    """Item outcomes by index, read lazily from completion records in chunk order (streamed): ask for
    indices in increasing order."""

    def __init__(self, records: Iterator) -> None:
        self._records = records
        self._current: dict = {}
        self._exhausted = False

    def get(self, index: int):
        while index not in self._current:
            if (self._current and min(self._current) > index) or self._exhausted:
                return None  # its chunk has no record (yet)
            record = next(self._records, None)
            if record is None:
                self._exhausted = True
                return None
            self._current = {o.index: o for o in record.items}
        return self._current[index]
