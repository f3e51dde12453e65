"""The job ledger in the object store: the manifest, its item pages, and one completion record per chunk.

Layout (under ``jobs/<job id>/``)::

    manifest.json                      JobManifest: prompts, models, options, batch size, total, page size
    items/p<page:06d>.json             the items of one page: [{"index", "image_key", "image_sha", "name"}]
    done/c<chunk:07d>-<letters>.json   ChunkRecord of a finished chunk; <letters> has one letter per item:
                                       d = done, p = failed for good, t = failed for now

The letters make a job's progress readable from **one listing** of ``done/`` (S3 returns 1,000 keys per
request): a status poll costs O(chunks / 1000) store requests, never one per image. A chunk that ran
twice (a redelivery, a re-send) may leave two records for a while; readers keep, per item, the best
outcome (done > failed for now > failed for good).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from slip.errors import InvalidKeyError, ObjectNotFoundError
from worker.jobs import JOB_ID, ChunkRecord, Item, JobManifest, parse_model
from worker.store import Store, job_prefix

_DONE_NAME = re.compile(r"c(\d{7})-([dpt]*)\.json")
_RANK = {"d": 2, "t": 1, "p": 0}  # which outcome of an item wins when a chunk has two records


def manifest_key(job_id: str) -> str:
    if not JOB_ID.fullmatch(job_id or ""):
        raise InvalidKeyError(f"{job_id!r} is not a job id (letters, digits, '-' and '_')")
    return f"{job_prefix(job_id)}/manifest.json"


def page_key(job_id: str, page: int) -> str:
    return f"{job_prefix(job_id)}/items/p{page:06d}.json"


def done_prefix(job_id: str) -> str:
    return f"{job_prefix(job_id)}/done"


def done_key(job_id: str, chunk: int, letters: str) -> str:
    return f"{done_prefix(job_id)}/c{chunk:07d}-{letters}.json"


# --- writing ----------------------------------------------------------------------------------------------


def write_job(store: Store, manifest: JobManifest, items: Sequence[Item]) -> None:
    """The item pages, then the manifest (its presence means the job is complete in the store)."""
    pages: dict[int, list[dict]] = {}
    for item in items:
        pages.setdefault(manifest.page_of(item.index), []).append(item.model_dump(mode="json"))
    for page, rows in pages.items():
        store.put_json(page_key(manifest.job_id, page), rows)
    store.put_json(manifest_key(manifest.job_id), manifest.model_dump(mode="json"))


def record_chunk(store: Store, record: ChunkRecord, *, replace_earlier: bool) -> str:
    """Write a chunk's completion record; with ``replace_earlier`` remove the chunk's older records."""
    key = done_key(record.job_id, record.chunk, record.letters)
    store.put_json(key, record.model_dump(mode="json"))
    if replace_earlier:  # the store lists folders, so list done/ and pick this chunk's names
        name = f"c{record.chunk:07d}-"
        for older in store.list(done_prefix(record.job_id)):
            if older.rsplit("/", 1)[-1].startswith(name) and older != key:
                store.delete(older)
    return key


# --- reading ----------------------------------------------------------------------------------------------


def load_manifest(store: Store, job_id: str) -> JobManifest:
    """The job's manifest; ObjectNotFoundError naming the store when there is none."""
    key = manifest_key(job_id)
    try:
        data = store.get_json(key)
    except ObjectNotFoundError as e:
        raise ObjectNotFoundError(f"no job {job_id!r} in store {store.url} ({key} is missing)") from e
    return parse_model(JobManifest, data)


def load_page(store: Store, manifest: JobManifest, page: int) -> list[Item]:
    return [parse_model(Item, row) for row in store.get_json(page_key(manifest.job_id, page))]


def iter_items(store: Store, manifest: JobManifest) -> Iterator[Item]:
    """Every item of the job, in index order, one page in memory at a time."""
    for page in range(-(-manifest.total // manifest.page_size)):
        yield from load_page(store, manifest, page)


def chunk_letters(store: Store, job_id: str) -> dict[int, str]:
    """Chunk -> its per-item letters, from one listing of ``done/`` (the best outcome per item)."""
    found: dict[int, str] = {}
    for key in store.list(done_prefix(job_id)):
        match = _DONE_NAME.fullmatch(key.rsplit("/", 1)[-1])
        if match:
            chunk, letters = int(match.group(1)), match.group(2)
            found[chunk] = letters if chunk not in found else _merge(found[chunk], letters)
    return found


def chunk_records(store: Store, job_id: str, chunks: Iterable[int] | None = None) -> Iterator[ChunkRecord]:
    """The completion records (the best one per chunk), in chunk order; only ``chunks`` when given."""
    wanted = None if chunks is None else set(chunks)
    best: dict[int, tuple[str, str]] = {}
    for key in store.list(done_prefix(job_id)):
        match = _DONE_NAME.fullmatch(key.rsplit("/", 1)[-1])
        if match and (wanted is None or int(match.group(1)) in wanted):
            chunk, letters = int(match.group(1)), match.group(2)
            if chunk not in best or _score(letters) > _score(best[chunk][0]):
                best[chunk] = (letters, key)
    for chunk in sorted(best):
        try:
            yield parse_model(ChunkRecord, store.get_json(best[chunk][1]))
        except ObjectNotFoundError:
            continue  # replaced by a newer record between the listing and the read


def _merge(a: str, b: str) -> str:
    """Per item, the better of two records' letters."""
    return "".join(max(x, y, key=_RANK.__getitem__) for x, y in zip(a, b))


def _score(letters: str) -> int:
    return sum(_RANK[x] for x in letters)


# --- status -----------------------------------------------------------------------------------------------

STATES = ("done", "failed", "running", "queued", "waiting", "lost")


@dataclass(frozen=True)
class JobStatus:
    """Counts by state of a job's images, and which chunks are in which state.

    ``done`` / ``failed``: a completion record says so; ``running``: a worker holds its chunk now; ``queued``:
    its chunk was sent and waits for a worker; ``waiting``: not sent yet (the job's in-flight window is
    full: normal); ``lost``: nothing will ever finish it (the job is not registered with the cluster).
    """

    manifest: JobManifest
    counts: dict[str, int]  # state -> images
    letters: dict[int, str]  # finished chunk -> per-item letters
    active: bool  # the cluster is still feeding the job
    retryable: int  # failed images a `slip retry` could re-run (failed for now)

    @property
    def finished(self) -> bool:
        """Nothing is left to happen by itself: every image is done, failed, or lost."""
        return self.counts["running"] + self.counts["queued"] + self.counts["waiting"] == 0

    def summary(self) -> dict:
        return {"job_id": self.manifest.job_id, "total": self.manifest.total, **self.counts,
                "active": self.active, "retryable": self.retryable}


def job_status(manifest: JobManifest, letters: dict[int, str], *, active: bool, running: set[int],
               sent: set[int]) -> JobStatus:
    """The status from the completion letters (store) and the cluster's view (Redis): ``running`` and
    ``sent`` chunks; ``active`` False when the job is not registered with the cluster."""
    counts = dict.fromkeys(STATES, 0)
    retryable = 0
    for chunk in range(manifest.chunks):
        size = len(manifest.chunk_range(chunk))
        if chunk in letters:  # finished once; a re-run of its failures may be under way
            done = letters[chunk].count("d")
            counts["done"] += done
            rest = "running" if chunk in running else "queued" if chunk in sent else "failed"
            counts[rest] += size - done
            retryable += letters[chunk].count("t") if rest == "failed" else 0
        elif chunk in running:
            counts["running"] += size
        elif chunk in sent:
            counts["queued"] += size
        else:
            counts["waiting" if active else "lost"] += size
    return JobStatus(manifest=manifest, counts=counts, letters=letters, active=active, retryable=retryable)
