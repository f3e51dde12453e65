"""The read side of a job: Redis's view of it, its completion records, and its units counted by state.

``done`` / ``failed``: a completion record says so (the store is the source of truth); ``running``: a live
worker holds its chunk now (its running mark, its heartbeat within ``SLIP_DEAD_AFTER``, its pool process
among the live ones); ``queued``: its chunk was sent and waits (or is taken back from a dead holder);
``waiting``: not sent yet (the window is full: normal); ``lost``: nothing will finish it (Redis does not know
the job: ``slip retry``). A poll costs one manifest read, one listing of ``done/`` (1,000 chunks per S3
request) and one Redis round trip, whatever the job's size; :func:`failure_groups` reads failed chunks only.
A chunk that ran twice may leave two records for a while: per unit the best outcome counts (d > t > p).
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator

from jobs.errors import ObjectNotFoundError
from jobs.ledger import done_prefix, load_manifest, load_page
from jobs.model import ChunkRecord, Item, JobManifest
from jobs.store import Store
from slip.options import parse_model

STATES = ("done", "failed", "running", "queued", "waiting", "lost")
_DONE_NAME = re.compile(r"c(\d{7})-([dpt]*)\.json")
_RANK = {"d": 2, "t": 1, "p": 0}  # which outcome of a unit wins when a chunk has two records
_VARIABLE = re.compile(r"'[^']*'|\"[^\"]*\"|\b[0-9a-f]{12,}\b|\d+(\.\d+)?")  # what differs between units' reasons


@dataclass(frozen=True)
class JobView:
    """One job as Redis sees it (:meth:`jobs.board.Board.views`), with every worker's heartbeat."""

    head: dict[str, str]  # the job hash (empty: Redis does not know the job)
    running: dict[int, dict]  # chunk -> its running mark {"attempt", "worker", "pid", "node", "at"}
    done: bytes  # the finished bits (chunk c: bit 7 - c % 8 of byte c // 8, as SETBIT writes)
    workers: dict[str, dict]  # instance -> its last heartbeat {"node", "host", "pid", "pids", "at", ...}

    @property
    def active(self) -> bool:
        return self.head.get("state") == "active"

    @property
    def next(self) -> int:
        return int(self.head.get("next", 0))

    def finished(self, chunk: int) -> bool:
        byte = chunk >> 3
        return byte < len(self.done) and bool(self.done[byte] & (0x80 >> (chunk & 7)))

    def live(self, dead_after_s: float, now: float | None = None) -> dict[int, dict]:
        """The running marks of workers that beat within ``dead_after_s`` whose pool process is among the
        ones that worker listed (when it lists them): the chunks a live worker holds now."""
        now = time.time() if now is None else now
        beats = {i: b for i, b in self.workers.items() if now - float(b.get("at", 0)) < dead_after_s}
        return {c: m for c, m in self.running.items() if m.get("worker") in beats
                and m.get("pid") in beats[m["worker"]].get("pids", [m.get("pid")])}


@dataclass(frozen=True)
class JobStatus:
    """Counts by state of a job's units, and each finished chunk's letters and best record key."""

    manifest: JobManifest
    counts: dict[str, int]  # state -> units
    letters: dict[int, str]  # finished chunk -> per-unit letters
    keys: dict[int, str]  # finished chunk -> the store key of its best record
    active: bool  # the cluster is still feeding the job
    retryable: int  # failed units a `slip retry` could re-run (failed for now)

    @property
    def finished(self) -> bool:
        """Nothing is left to happen by itself: every unit is done, failed, or lost."""
        return self.counts["running"] + self.counts["queued"] + self.counts["waiting"] == 0

    def summary(self) -> dict:
        return {"job_id": self.manifest.job_id, "kind": self.manifest.kind, "total": self.manifest.total,
                **self.counts, "active": self.active, "retryable": self.retryable}


@dataclass(frozen=True)
class FailureGroup:
    """Failed units that share a reason (numbers, hashes and quoted names aside)."""

    reason: str  # the first unit's reason, as written
    error: str | None  # the error class (or Poison, TimeLimit)
    permanent: bool  # a retry of the same request cannot help
    count: int
    examples: list[tuple[int, str]] = field(default_factory=list)  # (index, name) of a few units

    def to_json(self) -> dict:
        return {**asdict(self), "examples": [{"index": i, "name": n} for i, n in self.examples]}


def read_status(board, store: Store, job_id: str, *, dead_after_s: float) -> JobStatus:
    """The job's status now: the manifest, then Redis (``board``: :class:`jobs.board.Board`), then the listing
    (a chunk that finishes between the two reads is seen done, never lost)."""
    manifest = load_manifest(store, job_id)
    view = board.view(job_id)
    return job_status(manifest, chunk_listing(store, job_id), view, dead_after_s=dead_after_s)


def job_status(manifest: JobManifest, listing: dict[int, tuple[str, str]], view: JobView, *,
               dead_after_s: float) -> JobStatus:
    """The status from the store's ``listing`` (chunk -> (letters, key)) and Redis's ``view``."""
    counts, retryable = dict.fromkeys(STATES, 0), 0
    live, active = view.live(dead_after_s), view.active
    for chunk in range(manifest.chunks):
        size = len(manifest.chunk_range(chunk))
        in_flight = active and chunk < view.next and not view.finished(chunk)
        rest = "running" if chunk in live else "queued" if in_flight else None
        if chunk in listing:  # finished once; a re-run of its failures may be under way
            letters = listing[chunk][0]
            counts["done"] += letters.count("d")
            counts[rest or "failed"] += size - letters.count("d")
            retryable += 0 if rest else letters.count("t")
        else:
            counts[rest or ("waiting" if active else "lost")] += size
    return JobStatus(manifest=manifest, counts=counts, letters={c: v[0] for c, v in listing.items()},
                     keys={c: v[1] for c, v in listing.items()}, active=active, retryable=retryable)


def iter_items(store: Store, manifest: JobManifest) -> Iterator[Item]:
    """Every unit of the job, in index order, one page in memory at a time."""
    for page in range(-(-manifest.total // manifest.page_size)):
        yield from load_page(store, manifest, page)


def chunk_listing(store: Store, job_id: str) -> dict[int, tuple[str, str]]:
    """Chunk -> (its per-unit letters, the key of its best record), from one listing of ``done/``; a chunk
    with two records gets, per unit, the best letter of either."""
    found: dict[int, tuple[str, str, str]] = {}  # chunk -> (merged letters, best record's letters, its key)
    for key in store.list(done_prefix(job_id)):
        match = _DONE_NAME.fullmatch(key.rsplit("/", 1)[-1])
        if match:
            chunk, letters = int(match.group(1)), match.group(2)
            merged, best, best_key = found.get(chunk, (letters, letters, key))
            if _score(letters) > _score(best):
                best, best_key = letters, key
            found[chunk] = ("".join(max(x, y, key=_RANK.__getitem__) for x, y in zip(merged, letters)), best, best_key)
    return {chunk: (merged, key) for chunk, (merged, _, key) in found.items()}


def chunk_letters(store: Store, job_id: str) -> dict[int, str]:
    """Chunk -> its per-unit letters (see :func:`chunk_listing`)."""
    return {chunk: letters for chunk, (letters, _) in chunk_listing(store, job_id).items()}


def chunk_records(store: Store, job_id: str, chunks: Iterable[int] | None = None) -> Iterator[ChunkRecord]:
    """The completion records (the best one per chunk), in chunk order; only ``chunks`` when given."""
    wanted = None if chunks is None else set(chunks)
    for chunk, (_, key) in sorted(chunk_listing(store, job_id).items()):
        if wanted is None or chunk in wanted:
            try:
                yield parse_model(ChunkRecord, store.get_json(key))
            except ObjectNotFoundError:
                continue  # replaced by a newer record between the listing and the read


def failure_groups(store: Store, status: JobStatus, *, examples: int = 3, max_chunks: int = 100) -> list[FailureGroup]:
    """Failed units grouped by reason, biggest group first, from the records of at most ``max_chunks``
    failed chunks (one GET each) and the pages holding the examples (one GET each)."""
    groups: dict[tuple, dict] = {}
    failed = [c for c, letters in sorted(status.letters.items()) if letters.strip("d")][:max_chunks]
    for chunk in failed:
        for o in parse_model(ChunkRecord, store.get_json(status.keys[chunk])).items:
            if o.state == "failed":
                group = groups.setdefault((o.error, o.permanent, _VARIABLE.sub("…", o.reason or "")),
                                          {"reason": o.reason or "", "units": []})
                group["units"].append(o.index)
    wanted = {i for g in groups.values() for i in g["units"][:examples]}
    names = {item.index: item.name for page in sorted({status.manifest.page_of(i) for i in wanted})
             for item in load_page(store, status.manifest, page) if item.index in wanted}
    out = [FailureGroup(reason=g["reason"], error=error, permanent=permanent, count=len(g["units"]),
                        examples=[(i, names.get(i, "")) for i in g["units"][:examples]])
           for (error, permanent, _), g in groups.items()]
    return sorted(out, key=lambda g: -g.count)


def _score(letters: str) -> int:
    return sum(_RANK[x] for x in letters)
