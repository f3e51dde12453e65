"""The queue's Python client: submit jobs and leave, follow them, list them, export results, re-run failures.

>>> client = QueueClient(Settings.from_env(os.environ))
>>> job = client.submit_segment(["photos/"], ["a red car"])   # returns once the cluster has the job
>>> client.wait(job); list(client.export_items(job))

A job of any kind is written to the store (its manifest and unit pages: :mod:`jobs.ledger`), handed to the
cluster (its keys in Redis: :mod:`jobs.board`) and its first window of chunks is sent (``(job, chunk,
attempt)`` messages: :mod:`jobs.broker`). From then on the workers feed it themselves: the producer machine
can be switched off. ``status`` reads one listing of the job's completion records plus one Redis round trip,
whatever the job's size; the read side for lists, dashboards and metrics is :mod:`jobs.view`.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import redis

from jobs import view
from jobs.board import Board, connect
from jobs.broker import celery_app, queue_depths, sender, task_id
from jobs.errors import REDIS_ERRORS, BrokerError, StoreError
from jobs.ledger import load_manifest, summary_key, write_job
from jobs.model import Item, JobManifest, new_job_id
from jobs.segment import SegmentSpec
from jobs.settings import Settings
from jobs.status import FailureGroup, JobStatus, chunk_records, iter_items, read_status
from jobs.store import Store, input_key, sha256_bytes
from slip.errors import InputError
from slip.inputs import expand_paths, relative_names, submitted_root
from slip.options import SegmentOptions, parse_model
from slip.timing import utc_now

DEFAULT_BATCH = 4  # K: images per task
DEFAULT_IN_FLIGHT = 32  # M: chunks in flight at once, per job
UPLOAD_THREADS = 8  # parallel uploads (object stores answer each PUT in tens of ms)
Progress = Callable[[JobStatus], None]


def redis_hint(url: str, error: BaseException | None = None) -> str:
    """What to do when Redis at ``url`` does not answer (``error``: why): names the URL (its password hidden),
    its host and port; a refused password or a TLS failure is said as such."""
    from kombu.utils.url import maybe_sanitize_url

    parsed, shown = redis.connection.parse_url(url), maybe_sanitize_url(url)
    host, port = parsed.get("host", "127.0.0.1"), parsed.get("port", 6379)
    text = str(error or "").lower()
    if isinstance(error, redis.exceptions.AuthenticationError) or "auth" in text or "noperm" in text:
        return f"Redis at {shown} refused the password: set the one it expects in SLIP_BROKER_URL (REDIS_PASSWORD)"
    if "ssl" in text or "certificate" in text or "tls" in text:
        return (f"TLS with Redis at {shown} failed ({' '.join(str(error).split())[:200]}): check the rediss:// URL and "
                f"its ssl_cert_reqs / ssl_ca_certs options")
    if host in ("127.0.0.1", "localhost", "::1"):
        return (f"cannot reach Redis at {shown}: start it with `redis-server --port {port} --daemonize yes` (or `bash "
                f"scripts/setup.sh`), or point SLIP_BROKER_URL at a running one")
    return f"cannot reach Redis at {shown}: is it running on {host}:{port} and reachable from here? (SLIP_BROKER_URL)"


class QueueClient:
    """Talks to Redis and the object store on behalf of a producer (keyword-only injections for tests)."""

    def __init__(self, settings: Settings, *, app=None, store: Store | None = None) -> None:
        self.settings = settings
        self.app = app or celery_app(settings)
        self.store = store or Store(settings.store)
        self.board = Board(connect(settings.broker_url))
        self.send = sender(self.app)

    # --- connectivity -------------------------------------------------------------------------------

    def check_broker(self, timeout_s: float = 3.0) -> None:
        """BrokerError with a how-to when Redis does not answer."""
        client = redis.Redis.from_url(self.settings.broker_url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        try:
            client.ping()
        except (*REDIS_ERRORS, redis.exceptions.RedisError) as e:
            raise BrokerError(redis_hint(self.settings.broker_url, e)) from e
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

    def segment_spec(self, prompts: Sequence[str], options: SegmentOptions | dict | None = None, *,
                     engine: str | None = None, sam: str | None = None, clip: str | None = None,
                     keep_features: bool = False) -> SegmentSpec:
        """A segment job's spec, checked (one line per problem) before anything is uploaded; its ranker in a form
        every worker can load (:func:`jobs.rankers.publish_ranker`: a local directory is uploaded to the store).
        Defaults: SLIP_ENGINE, SLIP_SAM, SLIP_CLIP (the sam3 engine takes no ranker)."""
        from jobs.rankers import publish_ranker

        options = options if isinstance(options, SegmentOptions) else SegmentOptions.parse(options or {})
        models = self.settings.models
        engine = engine or models.engine
        clip = clip if engine == "sam3" else (clip or models.clip)
        spec = parse_model(SegmentSpec, {"prompts": list(prompts), "engine": engine, "sam": sam or models.sam,
                                         "clip": clip, "options": options, "keep_features": keep_features})
        return spec if spec.clip is None else spec.model_copy(update={"clip": publish_ranker(self.store, spec.clip)})

    def create_job(
        self, paths: Iterable[str | Path], prompts: Sequence[str], options: SegmentOptions | dict | None = None,
        *, engine: str | None = None, sam: str | None = None, clip: str | None = None, keep_features: bool = False,
        batch_size: int = DEFAULT_BATCH,
    ) -> JobManifest:
        """Validate, upload and write a segment job's manifest (pages first); nothing is sent yet."""
        spec = self.segment_spec(prompts, options, engine=engine, sam=sam, clip=clip, keep_features=keep_features)
        _check_batch(batch_size)
        files = expand_paths(paths)
        return self._write_segment_job(spec, self.upload(files), batch_size, root=str(submitted_root(files)))

    def create_from_job(
        self, job_id: str, *, prompts: Sequence[str] | None = None, options: SegmentOptions | dict | None = None,
        engine: str | None = None, sam: str | None = None, clip: str | None = None,
        keep_features: bool | None = None, batch_size: int | None = None,
    ) -> JobManifest:
        """A new segment job over the images of the segment job ``job_id`` (already in the store: nothing is
        uploaded, no local path is needed), with its prompts, engine, models and options unless given here
        (``options``: a dict overrides the old job's options one by one, a SegmentOptions replaces them)."""
        old = load_manifest(self.store, job_id)
        if old.kind != "segment":
            raise InputError(f"--from-job {job_id} is a {old.kind} job: only a segment job's images can be segmented "
                             f"again")
        was = SegmentSpec.model_validate(old.spec)
        if not isinstance(options, SegmentOptions):
            options = SegmentOptions.parse({**was.options.model_dump(mode="json"), **(options or {})})
        engine = engine or was.engine
        same_engine = engine == was.engine
        spec = self.segment_spec(
            prompts or was.prompts, options, engine=engine, sam=sam or (was.sam if same_engine else None),
            clip=clip or (was.clip if same_engine else None),
            keep_features=was.keep_features and same_engine if keep_features is None else keep_features)
        batch_size = batch_size or old.batch_size
        _check_batch(batch_size)
        return self._write_segment_job(spec, list(iter_items(self.store, old)), batch_size, root=old.root)

    def _write_segment_job(self, spec: SegmentSpec, items: list[Item], batch_size: int, *, root: str) -> JobManifest:
        manifest = JobManifest(job_id=new_job_id(), created=utc_now(), spec=spec, batch_size=batch_size,
                               total=len(items), page_size=JobManifest.page_size_for(batch_size), root=root)
        write_job(self.store, manifest, items)
        return manifest

    def submit_segment(
        self, paths: Iterable[str | Path], prompts: Sequence[str], options: SegmentOptions | dict | None = None,
        *, engine: str | None = None, sam: str | None = None, clip: str | None = None, keep_features: bool = False,
        batch_size: int = DEFAULT_BATCH, max_in_flight: int = DEFAULT_IN_FLIGHT,
        on_job: Callable[[str], None] | None = None,
    ) -> str:
        """Upload, write the manifest, hand the job to the cluster and send its first chunks; the job id.
        Returns without waiting: the workers keep ``max_in_flight`` chunks in flight until the job is done."""
        _check_in_flight(max_in_flight)
        self.check_broker()
        manifest = self.create_job(paths, prompts, options, engine=engine, sam=sam, clip=clip,
                                   keep_features=keep_features, batch_size=batch_size)
        return self.start(manifest, window=max_in_flight, on_job=on_job)

    def submit_from_job(self, job_id: str, *, max_in_flight: int = DEFAULT_IN_FLIGHT,
                        on_job: Callable[[str], None] | None = None, **changes) -> str:
        """:meth:`create_from_job` (``changes``: its keyword options), handed to the cluster; the new job's id.
        A new ranker re-answers the old job from its cached proposals (no SAM work), under the new ranker's keys."""
        _check_in_flight(max_in_flight)
        self.check_broker()
        return self.start(self.create_from_job(job_id, **changes), window=max_in_flight, on_job=on_job)

    def submit(self, kind: str, spec: dict, requests: Sequence[dict], *, job_id: str | None = None,
               names: Sequence[str] = (), on_job: Callable[[str], None] | None = None) -> str:
        """A job of ``kind`` (train, evaluate, train-sam) with one unit per request, all sent at once."""
        self.check_broker()
        items = [Item(index=i, name=names[i] if i < len(names) else "", request=r) for i, r in enumerate(requests)]
        manifest = JobManifest(job_id=job_id or new_job_id(), kind=kind, created=utc_now(), spec=spec, batch_size=1,
                               total=len(items), page_size=JobManifest.page_size_for(1))
        write_job(self.store, manifest, items)
        return self.start(manifest, window=manifest.chunks, on_job=on_job)

    def start(self, manifest: JobManifest, *, window: int, on_job: Callable[[str], None] | None = None) -> str:
        """Hand a written job to the cluster and send its first window; ``on_job(id)`` once the cluster has it."""
        created = datetime.fromisoformat(manifest.created).timestamp()
        self.board.register(manifest.job_id, kind=manifest.kind, chunks=manifest.chunks, total=manifest.total,
                            window=window, created=created)
        for chunk in self.board.claim(manifest.job_id):
            self.send(manifest.kind, manifest.job_id, chunk, 0, again=False)
        if on_job:
            on_job(manifest.job_id)  # only now: a printed id means the cluster has the job
        return manifest.job_id

    # --- follow ---------------------------------------------------------------------------------------

    def status(self, job_id: str) -> JobStatus:
        """Counts by state: one manifest read, one listing of the completion records, one Redis round trip."""
        return read_status(self.board, self.store, job_id, dead_after_s=self.settings.dead_after_s)

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

    def failed_units(self, status: JobStatus, *, limit: int = 20) -> list[tuple[int, str, str]]:
        """``(index, name, reason)`` of up to ``limit`` failed units (reads their chunks' records only)."""
        chunks = [c for c, letters in sorted(status.letters.items()) if letters.strip("d")]
        found: list[tuple[int, str]] = []
        for record in chunk_records(self.store, status.manifest.job_id, chunks):
            found += [(o.index, o.reason or "") for o in record.items if o.state == "failed"]
            if len(found) >= limit:
                break
        names = self._names(status.manifest, {i for i, _ in found[:limit]})
        return [(i, names.get(i, ""), reason) for i, reason in found[:limit]]

    def progress_notes(self, job_id: str) -> list[dict]:
        """What the running units of a training job report (epoch, validation figures), from Celery's backend."""
        marks = self.board.view(job_id).live(self.settings.dead_after_s)
        # one read per unit: state and info read apart can straddle the unit's end (PROGRESS, then its summary)
        metas = [self.app.backend.get_task_meta(task_id(job_id, c, m["attempt"])) for c, m in sorted(marks.items())]
        return [m["result"] for m in metas if m["status"] == "PROGRESS" and isinstance(m["result"], dict)]

    def retry(self, job_id: str, *, max_in_flight: int = DEFAULT_IN_FLIGHT) -> int:
        """Re-run the job's failed units on purpose, and hand the cluster back a job it lost (a Redis that lost
        its data): the finished chunks are marked finished, the rest are sent. How many units go again."""
        self.check_broker()
        status = self.status(job_id)
        view = self.board.view(job_id)
        manifest, head = status.manifest, view.head
        # chunks with failures that are finished for good (one still running its failures again is left alone)
        failed = {c: v for c, v in status.letters.items() if v.strip("d") and (view.finished(c) or not head)}
        if not head or not status.active:  # hand it (back) to the cluster; a lost job's finished chunks stay so
            window = int(head.get("window", 0)) or (max_in_flight if manifest.kind == "segment" else manifest.chunks)
            self.board.register(job_id, kind=manifest.kind, chunks=manifest.chunks, total=manifest.total, window=window,
                                created=datetime.fromisoformat(manifest.created).timestamp())
            if not head:
                self.board.mark_done(job_id, {c: v for c, v in status.letters.items() if c not in failed})
        if failed and head:
            self.board.reopen(job_id, failed)
            for chunk in sorted(failed):
                self.send(manifest.kind, job_id, chunk, 0, again=False)
        if failed or status.counts["lost"]:
            self.store.delete(summary_key(job_id))
            for chunk in self.board.claim(job_id):
                self.send(manifest.kind, job_id, chunk, 0, again=False)
        return status.counts["lost"] + sum(len(v) - v.count("d") for v in failed.values())

    # --- the read side (jobs.view): `slip jobs`, the dashboard, metrics --------------------------------

    def jobs(self, *, state: str | None = None, kind: str | None = None, limit: int = 100) -> list[view.JobRow]:
        """The newest jobs of every kind (active first) with counts, rate, ETA and age."""
        return view.list_jobs(self.board, self.store, dead_after_s=self.settings.dead_after_s, state=state, kind=kind,
                              limit=limit)

    def job(self, job_id: str) -> view.JobRow:
        return view.job(self.board, self.store, job_id, dead_after_s=self.settings.dead_after_s)

    def failures(self, job_id: str, *, examples: int = 3) -> list[FailureGroup]:
        """The job's failed units grouped by reason, biggest group first, with a few examples each."""
        return view.failures(self.board, self.store, job_id, dead_after_s=self.settings.dead_after_s, examples=examples)

    def workers(self) -> list[view.WorkerRow]:
        return view.workers(self.board, dead_after_s=self.settings.dead_after_s)

    def queue_depths(self) -> dict[str, int]:
        return queue_depths(self.app)

    # --- results --------------------------------------------------------------------------------------

    def export_items(self, job_id: str):
        """Every image of the job as a ``producer.exports.ExportItem``, in index order, streamed (one manifest
        page and one completion record in memory at a time)."""
        from producer.exports import ExportItem

        manifest = load_manifest(self.store, job_id)
        outcomes = _Outcomes(chunk_records(self.store, job_id))
        for item in iter_items(self.store, manifest):
            outcome = outcomes.get(item.index)
            state = "pending" if outcome is None else outcome.state
            doc = self.store.get_json(f"{outcome.result_key}/segments.json") if state == "done" else None
            yield ExportItem(index=item.index, name=item.name, state=state, doc=doc,
                             reason=None if outcome is None else outcome.reason,
                             image=lambda key=item.image_key: self.store.get_bytes(key),
                             image_file=self.store.path(item.image_key) if self.store.local else None)

    def item_names(self, job_id: str) -> list[str]:
        """Every image's name in the job, in index order (the manifest's pages only: no result read)."""
        return [item.name for item in iter_items(self.store, load_manifest(self.store, job_id))]

    def _names(self, manifest: JobManifest, indices: set[int]) -> dict[int, str]:
        names = {}
        for item in iter_items(self.store, manifest):
            if item.index in indices:
                names[item.index] = item.name
                if len(names) == len(indices):
                    break
        return names


def _check_batch(batch_size: int) -> None:
    if not 1 <= batch_size <= 64:
        raise InputError(f"batch size must be between 1 and 64 images per task, got {batch_size}")


def _check_in_flight(max_in_flight: int) -> None:
    if max_in_flight < 1:
        raise InputError(f"max in-flight chunks must be at least 1, got {max_in_flight}")


class _Outcomes:
    """Unit outcomes by index, read lazily from completion records in chunk order (streamed): ask for
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
