"""The control plane in-process: the reaper, the Redis scripts, the completion records and the status, against
the real Redis (db 11) and a real directory store; only the sender is a recorder (nothing reaches Celery), and
"time passes" is a beat at a later ``now``. A real run makes these properties a matter of luck: the beat after
a worker's death, a pool process's death, a chunk finishing between a status poll's two reads, two reapers at
once, a job whose messages vanished, a chunk whose units keep failing for now.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import pytest

from queue_helpers import flush, redis_url
import redis_dbs

DB = redis_dbs.REAPER
PROMPT = "a red box"


class Recorder:
    """A sender that keeps the messages instead of handing them to Celery."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, int, int, bool]] = []

    def __call__(self, kind: str, job: str, chunk: int, attempt: int, *, again: bool) -> None:
        self.sent.append((kind, job, chunk, attempt, again))


@pytest.fixture
def plane(redis_alive, tmp_path):
    """The real board, store and settings on db 11; ``reaper(instance)`` builds a reaper whose queue is empty
    unless ``plane["queued"]`` says otherwise."""
    from jobs.board import Board, connect
    from jobs.reaper import Reaper
    from jobs.settings import Settings
    from jobs.store import Store

    flush(DB)
    settings = Settings(broker_url=redis_url(DB), store=str(tmp_path / "store"), dead_after_s=6.0, lost_after_s=5.0)
    board, store, recorder = Board(connect(settings.broker_url)), Store(settings.store), Recorder()
    state = {"queued": 0}

    def reaper(instance: str = "me") -> Reaper:
        return Reaper(board=board, store=store, settings=settings, send=recorder, instance=instance,
                      node=f"{instance}@host", queue_empty=lambda: state["queued"] == 0)

    yield {"settings": settings, "board": board, "store": store, "sent": recorder.sent, "reaper": reaper,
           "state": state, "send": recorder}
    board.r.close()
    flush(DB)


def write_job(plane, job: str, *, images: int, batch: int, window: int = 32, sam: str = "tiny-random"):
    """A segment job as a producer leaves it: manifest and pages written, registered, first window claimed."""
    from jobs.ledger import write_job as write
    from jobs.model import Item, JobManifest
    from jobs.segment import SegmentSpec

    items = []
    for i in range(images):
        sha = hashlib.sha256(f"{job}-{i}".encode()).hexdigest()
        items.append(Item(index=i, image_key=f"inputs/{sha}.png", image_sha=sha, name=f"{i}.png"))
    manifest = JobManifest(job_id=job, created="2026-01-01T00:00:00+00:00", batch_size=batch, total=images,
                           spec=SegmentSpec(prompts=(PROMPT,), sam=sam, clip="tiny-random"),
                           page_size=JobManifest.page_size_for(batch))
    write(plane["store"], manifest, items)
    plane["board"].register(job, kind="segment", chunks=manifest.chunks, total=images, window=window,
                            created=time.time())
    return manifest


def mark(board, job: str, chunk: int, *, worker: str, pid: int, at: float | None = None, attempt: int = 0) -> str:
    """What a task does as it starts: its running mark (returned as text)."""
    from jobs.reaper import mark_json

    text = mark_json({"attempt": attempt, "worker": worker, "pid": pid, "node": f"{worker}@host",
                      "at": time.time() if at is None else at})
    assert board.begin(job, chunk, attempt, text)
    return text


def dead_pid() -> int:
    """The pid of a process of this host that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_window_is_claimed_atomically_and_never_exceeded(plane):
    board = plane["board"]
    write_job(plane, "win", images=10, batch=1, window=3)
    assert board.claim("win") == [0, 1, 2] and board.claim("win") == []
    mark_text = mark(board, "win", 1, worker="w", pid=os.getpid())
    assert board.finish("win", 1, 0, mark_text, again=False, done=1, failed=0) == 0
    assert board.claim("win") == [3], "one finished, one more sent"


def test_a_producer_that_died_before_sending_is_fed_by_the_reaper(plane):
    write_job(plane, "fed", images=4, batch=1, window=2)
    plane["reaper"]().beat()
    assert plane["sent"] == [("segment", "fed", 0, 0, False), ("segment", "fed", 1, 0, False)]


def test_one_dead_worker_means_one_resend_of_its_chunk_ahead_of_first_sends(plane):
    """A dead worker's chunk is sent again once, at the front of the queue; while that message waits, later
    beats (of any worker) must not send it again: each send is an attempt of the chunk's budget."""
    board, now = plane["board"], time.time()
    write_job(plane, "dead", images=4, batch=2)
    board.claim("dead")
    mark(board, "dead", 0, worker="gone-instance", pid=1, at=now - 60)  # it never beat, and its mark is old
    did = plane["reaper"]("left").beat(now)
    assert plane["sent"] == [("segment", "dead", 0, 1, True)], plane["sent"]
    assert did == ["job dead chunk 0: sending again (attempt 1): worker gone-instance@host stopped beating"]
    for reaper in (plane["reaper"]("left"), plane["reaper"]("right"), plane["reaper"]("left")):
        reaper.beat(now + 1)
    assert len(plane["sent"]) == 1, plane["sent"]


def test_a_new_worker_that_has_not_beaten_yet_is_not_dead(plane):
    board, now = plane["board"], time.time()
    write_job(plane, "young", images=2, batch=2)
    board.claim("young")
    mark(board, "young", 0, worker="just-started", pid=1, at=now)
    plane["reaper"]().beat(now + 1)
    assert plane["sent"] == []
    plane["reaper"]().beat(now + plane["settings"].dead_after_s + 1)
    assert plane["sent"] == [("segment", "young", 0, 1, True)]


def test_a_dead_pool_process_chunk_is_sent_again_at_once_by_its_own_worker(plane):
    """The OOM killer takes a pool process: on its next beat (not SLIP_DEAD_AFTER later) the worker's own
    reaper sends the chunk again at the front; a chunk of a live pool process stays where it is."""
    board = plane["board"]
    write_job(plane, "pool", images=4, batch=1)
    board.claim("pool")
    mark(board, "pool", 0, worker="me", pid=dead_pid())
    mark(board, "pool", 1, worker="me", pid=os.getpid())
    plane["reaper"]("me").beat()
    assert plane["sent"] == [("segment", "pool", 0, 1, True)]
    assert sorted(board.view("pool").running) == [1]
    assert not board.begin("pool", 0, 0, "{}"), "the message Celery put back for the dead process is stale now"


def test_a_put_back_message_of_a_held_attempt_is_stale_so_each_crash_spends_an_attempt(plane):
    """Celery puts a killed pool process's message back at once (task_reject_on_worker_lost), before any reaper
    beats: it must not run the same attempt again (a chunk that kills its process each time would never use up
    SLIP_MAX_ATTEMPTS); the reaper's next attempt runs."""
    board = plane["board"]
    write_job(plane, "held", images=2, batch=1)
    board.claim("held")
    mark(board, "held", 0, worker="me", pid=dead_pid())
    assert not board.begin("held", 0, 0, "{}"), "the put-back message of the held attempt 0 ran again"
    plane["reaper"]("me").beat()
    assert plane["sent"] == [("segment", "held", 0, 1, True)]
    assert board.begin("held", 0, 1, "{}"), "attempt 1, sent by the reaper, runs"
    assert not board.begin("held", 0, 1, "{}"), "a second delivery while attempt 1 runs"
    assert board.begin("held", 1, 0, "{}"), "a chunk nobody holds starts as usual"


def test_two_reapers_at_once_send_a_dead_holders_chunk_once(plane):
    board, now = plane["board"], time.time()
    write_job(plane, "twice", images=8, batch=1)
    board.claim("twice")
    for chunk in range(4):
        mark(board, "twice", chunk, worker="gone", pid=1, at=now - 60)
    left, right = plane["reaper"]("left"), plane["reaper"]("right")
    views = board.views(["twice"])  # both read the same marks before either acts
    from jobs.reaper import mark_json

    for reaper in (left, right):
        for chunk, held in views[0].running.items():
            if (attempt := board.reclaim("twice", chunk, mark_json(held))) is not None:
                plane["send"]("segment", "twice", chunk, attempt, again=True)
    assert sorted(s[2] for s in plane["sent"]) == [0, 1, 2, 3], plane["sent"]


def test_a_stalled_job_whose_messages_vanished_is_sent_again_once_the_queue_is_empty(plane):
    board, state, now = plane["board"], plane["state"], time.time()
    write_job(plane, "lost", images=6, batch=2, window=2)
    board.claim("lost")  # sent... and lost (a Redis that dropped its last writes, a half-done publish)
    reaper = plane["reaper"]()
    reaper.beat(now)
    assert plane["sent"] == [], "a job is not called lost before SLIP_LOST_AFTER"
    state["queued"] = 5  # messages wait in the queue: ours may be among them
    reaper.beat(now + 60)
    assert plane["sent"] == []
    state["queued"] = 0
    held = mark(board, "lost", 1, worker="me", pid=os.getpid())
    reaper.beat(now + 60)
    assert plane["sent"] == [], "a live worker runs one of its chunks: the job progresses"
    board.release("lost", 1, held)
    board.r.hset(board.key("lost"), "progress", now - 60)
    did = reaper.beat(time.time())
    assert sorted(plane["sent"]) == [("segment", "lost", 0, 1, True), ("segment", "lost", 1, 1, True)], plane["sent"]
    assert all("its message was lost" in line for line in did)
    reaper.beat(time.time())
    assert len(plane["sent"]) == 2, "sent once: the job made progress (it was sent)"


def test_a_finished_job_is_closed_and_leaves_the_active_set(plane):
    board = plane["board"]
    write_job(plane, "closed", images=2, batch=1)
    for chunk in board.claim("closed"):
        held = mark(board, "closed", chunk, worker="me", pid=os.getpid())
        code = board.finish("closed", chunk, 0, held, again=False, done=1, failed=0)
    assert code == 1, "the last chunk finished the job"
    plane["reaper"]().beat()  # the task that finished it died before closing it: the reaper does
    assert "closed" not in board.active() and board.view("closed").head["state"] == "finished"
    assert 0 < board.r.ttl(board.key("closed", "done")) <= plane["settings"].result_expires_s


def test_temporaries_of_a_dead_writer_are_swept_and_a_live_writers_kept(plane):
    import socket

    store = plane["store"]
    store.put_bytes("a.json", b"{}")  # makes the store's folders
    host = socket.gethostname().replace("-", "_")
    tmp = os.path.join(store.root, ".tmp")
    os.makedirs(tmp, exist_ok=True)
    dead, live = (os.path.join(tmp, f".tmp-{host}-{pid}-0123abcd") for pid in (dead_pid(), os.getpid()))
    for path in (dead, live):
        with open(path, "wb") as f:
            f.write(b"half a result")
    plane["reaper"]().beat()
    assert not os.path.exists(dead) and os.path.exists(live)


def test_a_chunk_finishing_during_a_status_poll_is_never_called_lost(plane):
    """The last chunk finishes (record, Redis, the job closed) between the poll's Redis read and its listing
    of done/: the poll must say done (or running), never lost."""
    from jobs.ledger import record_chunk
    from jobs.model import ChunkRecord, ItemOutcome
    from jobs.status import read_status
    from jobs.store import Store

    board, store = plane["board"], plane["store"]
    manifest = write_job(plane, "race", images=4, batch=2)
    board.claim("race")

    def finish_chunk(chunk: int, held: str | None = None) -> None:
        held = held or mark(board, "race", chunk, worker="alive", pid=os.getpid())
        outcomes = [ItemOutcome(index=i, state="done", result_key="results/x/y") for i in manifest.chunk_range(chunk)]
        record_chunk(store, ChunkRecord(job_id="race", chunk=chunk, task_id="t", worker="w", finished="now",
                                        items=outcomes), replace_earlier=False)
        if board.finish("race", chunk, 0, held, again=False, done=2, failed=0) == 1:
            board.close("race", keep_s=60)

    finish_chunk(0)
    board.beat("alive", {"node": "alive@host", "at": time.time()})
    running = mark(board, "race", 1, worker="alive", pid=os.getpid())

    class ListingThenTheWorkerFinishes(Store):
        def list(self, prefix: str = "") -> list[str]:
            if prefix.endswith("/done") and not hooks_ran:
                hooks_ran.append(True)
                finish_chunk(1, running)
            return super().list(prefix)

    hooks_ran: list[bool] = []
    status = read_status(board, ListingThenTheWorkerFinishes(store.url), "race", dead_after_s=6.0)
    assert hooks_ran and not board.view("race").active  # the job did close between the two reads
    assert status.counts["lost"] == 0 and status.counts["done"] == 4, status.summary()


def test_running_means_a_live_worker_holds_the_chunk(plane):
    from jobs.status import read_status

    board, now = plane["board"], time.time()
    write_job(plane, "live", images=3, batch=1)
    board.claim("live")
    board.beat("alive", {"node": "alive@host", "at": now})
    board.beat("dead", {"node": "dead@host", "at": now - 60})
    mark(board, "live", 0, worker="alive", pid=os.getpid())
    mark(board, "live", 1, worker="dead", pid=1, at=now - 60)
    counts = read_status(board, plane["store"], "live", dead_after_s=6.0).counts
    assert (counts["running"], counts["queued"]) == (1, 2), counts


def test_a_chunk_that_keeps_failing_for_now_ends_failed_for_now_not_poison(plane):
    """Each run of the chunk finishes (its images fail for now: no worker serves the job's models); it runs
    again while it has attempts; the last outcome is 'failed for now' with the real reason, not a poison
    verdict (which is for chunks that never finish)."""
    from dataclasses import replace

    from jobs.status import chunk_records
    from worker.resources import load_resources
    from worker.tasks import run_chunk

    board, settings = plane["board"], replace(plane["settings"], max_attempts=3)
    write_job(plane, "flaky", images=2, batch=2, sam="some-other-sam")
    res = load_resources(settings, load_models=False, send=plane["send"], instance="in-process")
    for chunk in board.claim("flaky"):  # as the producer does
        plane["send"]("segment", "flaky", chunk, 0, again=False)
    runs = []
    while plane["sent"] and len(runs) < 10:
        _, job, chunk, attempt, _ = plane["sent"].pop(0)
        runs.append(run_chunk(res, job, chunk, attempt, task_id=f"t{attempt}", node="in-process@host"))
    res.close()
    assert [r["attempt"] for r in runs] == [0, 1, 2] and all(r["letters"] == "tt" for r in runs), runs
    (record,) = chunk_records(plane["store"], "flaky")
    assert record.attempt == 2 and all("serves sam=" in o.reason and o.error == "ModelMismatchError"
                                       for o in record.items), record
    assert board.view("flaky").finished(0) and "flaky" not in board.active()


def test_a_chunks_new_record_replaces_its_earlier_ones(plane):
    """A chunk that ran twice keeps one completion record: the newer one."""
    from jobs.ledger import done_prefix, record_chunk
    from jobs.model import ChunkRecord, ItemOutcome

    store = plane["store"]

    def record(state: str) -> ChunkRecord:
        return ChunkRecord(job_id="twice", chunk=0, task_id=state, worker="w", finished="now",
                           items=[ItemOutcome(index=0, state=state, permanent=False, reason=None if state == "done" else "x")])

    record_chunk(store, record("failed"), replace_earlier=False)
    record_chunk(store, record("done"), replace_earlier=True)
    assert store.list(done_prefix("twice")) == ["jobs/twice/done/c0000000-d.json"], (
        "the earlier record of the chunk is still there after a record with replace_earlier=True")


def test_the_read_side_lists_jobs_workers_and_failures(plane):
    from jobs import view
    from jobs.ledger import record_chunk
    from jobs.model import ChunkRecord, ItemOutcome

    board, store, now = plane["board"], plane["store"], time.time()
    manifest = write_job(plane, "listed", images=8, batch=2)
    board.claim("listed")
    board.beat("w1", {"node": "w1@host", "host": "host", "at": now, "units": 6, "rate": 1.5})
    held = mark(board, "listed", 1, worker="w1", pid=os.getpid())
    outcomes = [ItemOutcome(index=0, state="done"), ItemOutcome(index=1, state="failed", permanent=True,
                                                                 reason="image 'a.png' is not an image", error="ImageError")]
    record_chunk(store, ChunkRecord(job_id="listed", chunk=0, task_id="t", worker="w1", finished="now", items=outcomes),
                 replace_earlier=False)
    held0 = mark(board, "listed", 0, worker="w1", pid=os.getpid())
    board.finish("listed", 0, 0, held0, again=False, done=1, failed=1)
    (row,) = view.list_jobs(board, store, dead_after_s=6.0)
    assert (row.job_id, row.kind, row.state, row.unit, row.total) == ("listed", "segment", "active", "image", 8)
    assert (row.done, row.failed, row.running, row.queued, row.waiting, row.in_flight) == (1, 1, 2, 4, 0, 3), row
    assert row.rate is not None and row.age_s >= 0 and row.created
    assert view.list_jobs(board, store, dead_after_s=6.0, state="finished") == []
    (worker,) = view.workers(board, dead_after_s=6.0)
    assert (worker.node, worker.alive, worker.job, worker.chunk, worker.rate) == ("w1@host", True, "listed", 1, 1.5)
    (group,) = view.failures(board, store, "listed", dead_after_s=6.0)
    assert (group.count, group.error, group.permanent, group.examples) == (1, "ImageError", True, [(1, "1.png")])
    assert held and manifest.total == 8
