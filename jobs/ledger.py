"""A job in the object store: its keys, and what producers and workers write and read to run it.

Layout (under ``jobs/<job id>/``)::

    manifest.json                      JobManifest: kind, spec, chunk size, total, page size
    items/p<page:06d>.json             the units of one page: [Item as JSON]
    done/c<chunk:07d>-<letters>.json   ChunkRecord of a finished chunk; <letters> has one letter per unit:
                                       d = done, p = failed for good, t = failed for now
    summary.json                       {"row", "failures"} of a finished job (jobs.view; the readers' cache)

The letters make a job's progress readable from one listing of ``done/`` (:mod:`jobs.status`).
"""

from __future__ import annotations

from typing import Sequence

from jobs.errors import InvalidKeyError, ObjectNotFoundError
from jobs.keys import job_prefix
from jobs.model import JOB_ID, ChunkRecord, Item, JobManifest
from jobs.store import Store
from slip.options import parse_model


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


def summary_key(job_id: str) -> str:
    return f"{job_prefix(job_id)}/summary.json"


def write_job(store: Store, manifest: JobManifest, items: Sequence[Item]) -> None:
    """The unit pages, then the manifest (its presence means the job is complete in the store)."""
    pages: dict[int, list[dict]] = {}
    for item in items:
        pages.setdefault(manifest.page_of(item.index), []).append(item.model_dump(mode="json", exclude_defaults=True))
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


def chunk_items(pages: dict[int, list[Item]], manifest: JobManifest, chunk: int, load) -> list[Item]:
    """The units of ``chunk``; ``pages`` caches pages by number, ``load(page)`` reads a missing one."""
    indices = manifest.chunk_range(chunk)
    items = []
    for page in sorted({manifest.page_of(i) for i in indices}):
        if page not in pages:
            pages[page] = load(page)
        start = page * manifest.page_size
        items += [pages[page][i - start] for i in indices if manifest.page_of(i) == page]
    return items
