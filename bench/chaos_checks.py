"""The job side of the queue benchmarks: tiny images, ``slip submit`` as a real process (killable at a chosen
moment), status polls, and the checks of what the store holds afterwards (exactly one complete result per
image, no torn result, temporary files left, the COCO export)."""

from __future__ import annotations

import json
import os
import random
import re
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import redis
from PIL import Image

from bench.processes import Worker

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red box"
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")




def make_images(folder: Path, count: int, *, seed: int = 0) -> list[Path]:
    """``count`` distinct small RGB PNGs (40-64 px a side): a red box and a blue disc on noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        h, w = int(rng.integers(40, 64)), int(rng.integers(40, 64))
        image = (rng.random((h, w, 3)) * 60).astype(np.uint8)
        y, x = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        image[y : y + h // 3, x : x + w // 3] = (220, 30, 30)
        yy, xx = np.mgrid[:h, :w]
        image[(yy - 2 * h // 3) ** 2 + (xx - 2 * w // 3) ** 2 < (min(h, w) // 5) ** 2] = (30, 30, 220)
        path = folder / f"img_{i:05d}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


@dataclass
class Submitted:
    """What the producer subprocess did."""

    job_id: str
    seconds: float  # from its start to the job id on its stdout
    killed: bool  # SIGKILLed right after it printed the id
    returncode: int | None  # exit code when not killed
    stderr: str


def submit(env: dict[str, str], folder: Path, args: Sequence[str], *, kill: bool, timeout_s: float = 600.0,
           before_kill: Callable[[str], None] | None = None, log: Path | None = None) -> Submitted:
    """``slip submit segment FOLDER --prompt PROMPT ARGS`` as a real process (``python -m producer``); its
    first stdout line is the job id. ``kill``: SIGKILL it the moment that line is read (``before_kill(job)``
    runs first, e.g. to look at Redis), else wait for it to exit."""
    command = [sys.executable, "-m", "producer", "submit", "segment", str(folder), "--prompt", PROMPT, *args]
    err_path = log or Path(tempfile.mkstemp(prefix="slip-submit-", suffix=".err")[1])
    start = time.monotonic()
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, start_new_session=True)
    try:
        line = _read_line(proc, timeout_s)
        seconds = time.monotonic() - start
        job = line.strip()
        if not JOB_ID.fullmatch(job):
            proc.wait(timeout=60)
            raise RuntimeError(f"slip submit printed {line!r}, not a job id (exit {proc.returncode}): "
                               f"{Path(err_path).read_text(errors='replace')[-2000:]}")
        if kill:
            if before_kill:
                before_kill(job)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return Submitted(job, seconds, True, None, Path(err_path).read_text(errors="replace"))
        proc.wait(timeout=timeout_s)
        return Submitted(job, time.monotonic() - start, False, proc.returncode, Path(err_path).read_text(errors="replace"))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


def _read_line(proc: subprocess.Popen, timeout_s: float) -> str:
    """The first line ``proc`` writes on stdout (unbuffered read, bounded by ``timeout_s``)."""
    fd, data, deadline = proc.stdout.fileno(), b"", time.monotonic() + timeout_s
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError(f"slip submit printed no job id in {timeout_s} s")
        ready, _, _ = select.select([fd], [], [], min(remaining, 1.0))
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                proc.wait(timeout=30)
                raise RuntimeError(f"slip submit exited ({proc.returncode}) without printing a job id")
            data += chunk
    return data.split(b"\n", 1)[0].decode()


def running(r: redis.Redis, job: str) -> dict[int, dict]:
    """``slip:job:<id>:running``: chunk -> {"attempt", "worker", "pid", "node", "at"}."""
    return {int(k): json.loads(v) for k, v in r.hgetall(f"slip:job:{job}:running").items()}


def holder_of(r: redis.Redis, job: str, workers: Sequence[Worker], *, pool: bool,
              avoid: frozenset[int] = frozenset()) -> tuple[Worker, int] | None:
    """A live worker of ``workers`` that holds a chunk of ``job`` now, and the chunk: its running mark was
    written by the worker's current process (after its start and, for a pool kill, after the last one).
    Chunks in ``avoid`` are taken only when no other chunk is running."""
    found = []
    for chunk, mark in running(r, job).items():
        for worker in workers:
            since = max(worker.started_at, worker.pool_killed_at if pool else 0.0)
            if worker.alive and mark.get("node") == worker.node and mark.get("at", 0) > since:
                found.append((worker, chunk))
    fresh = [(w, c) for w, c in found if c not in avoid]
    return random.choice(fresh or found) if found else None


@dataclass
class Poll:
    """The job's status over time, as :meth:`producer.client.QueueClient.status` reads it."""

    samples: list[tuple[float, dict]] = field(default_factory=list)  # (seconds since start, summary)
    troubles: int = 0  # polls that raised (Redis or the store away)
    ever_lost: int = 0  # the most images a poll called "lost"


def wait_finished(client, job: str, *, timeout_s: float, poll_s: float = 1.0, start: float | None = None,
                  poll: Poll | None = None):
    """Poll the status until the job is finished (or ``timeout_s``); (status, Poll). Rides out outages."""
    from slip.errors import SlipError

    start = time.monotonic() if start is None else start
    poll = poll or Poll()
    status = None
    while True:
        try:
            status = client.status(job)
            summary = status.summary()
            poll.samples.append((round(time.monotonic() - start, 2), summary))
            poll.ever_lost = max(poll.ever_lost, summary["lost"])
            if status.finished:
                return status, poll
        except (SlipError, redis.exceptions.RedisError, OSError):
            poll.troubles += 1
        if time.monotonic() - start > timeout_s:
            return status, poll
        time.sleep(poll_s)


# ---------------------------------------------------------------------------------------------- checks


def verify(client, job: str) -> dict:
    """Check the store after a job: every image exactly one complete result (one ``segments.json`` under
    ``results/<image sha>/``, parseable, every mask decodable to the image's size), which images have none,
    torn result folders, temporaries left by killed writers. Returns the counts and up to 10 examples."""
    from pycocotools import mask as mask_utils

    from jobs.ledger import load_manifest
    from jobs.status import chunk_records, iter_items

    store = client.store
    manifest = load_manifest(store, job)
    outcomes = {o.index: o for record in chunk_records(store, job) for o in record.items}
    results: dict[str, list[str]] = {}
    other_files: dict[str, list[str]] = {}
    for key in store.list("results"):
        _, sha, digest_, name = key.split("/", 3)
        folder = f"results/{sha}/{digest_}"
        (results if name == "segments.json" else other_files).setdefault(folder, []).append(name)
    by_sha: dict[str, list[str]] = {}
    for folder in results:
        by_sha.setdefault(folder.split("/")[1], []).append(folder)
    counts = {"images": manifest.total, "exactly_once": 0, "none": 0, "several": 0, "torn": 0, "not_done": 0,
              "segments": 0}
    examples: list[str] = []
    for item in iter_items(store, manifest):
        folders = by_sha.get(item.image_sha, [])
        outcome = outcomes.get(item.index)
        if outcome is None or outcome.state != "done":
            counts["not_done"] += 1
            examples.append(f"{item.name}: {'no record' if outcome is None else outcome.reason}")
        if not folders:
            counts["none"] += 1
            continue
        if len(folders) > 1:
            counts["several"] += 1
            examples.append(f"{item.name}: {len(folders)} results {folders}")
            continue
        try:
            doc = store.get_json(f"{folders[0]}/segments.json")
            size = [doc["image_size"]["height"], doc["image_size"]["width"]]
            for segment in doc["segments"]:
                rle = dict(segment["segmentation"])
                rle["counts"] = rle["counts"].encode()
                if list(mask_utils.decode(rle).shape) != size:
                    raise ValueError(f"mask of size {mask_utils.decode(rle).shape} in an image of size {size}")
            counts["segments"] += len(doc["segments"])
            if outcome is not None and outcome.state == "done" and outcome.result_key != folders[0]:
                raise ValueError(f"its record names {outcome.result_key}, the store holds {folders[0]}")
            counts["exactly_once"] += 1
        except Exception as e:  # a torn or foreign result: counted, shown
            counts["torn"] += 1
            examples.append(f"{item.name}: {type(e).__name__}: {e}")
    counts["folders_without_result"] = len(set(other_files) - set(results))
    counts["temporaries"] = len(temporaries(store))
    counts["examples"] = examples[:10]
    return counts


def temporaries(store) -> list[str]:
    """Temporary files under the store root (``.tmp/``, or any ``.tmp-`` name); none exist on object stores."""
    if not store.local:
        return [k for k in store.list() if ".tmp" in k]
    root = Path(store.root)
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and (".tmp" in p.name or
                                                                                   ".tmp" in p.parts)]


def coco_check(client, job: str, out: Path) -> dict:
    """The job's COCO export (``producer.exports.write_export``) loaded by ``pycocotools.coco.COCO``."""
    try:
        from producer.exports import write_export
    except ImportError as e:
        return {"skipped": f"producer.exports is not there yet ({e}): COCO export not checked"}
    import contextlib
    import io

    from pycocotools.coco import COCO

    from jobs.ledger import load_manifest

    manifest = load_manifest(client.store, job)
    summary = write_export(client.export_items(job), format="coco", out=out, prompts=manifest.spec["prompts"],
                           job_id=job)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(out))
    for ann in coco.loadAnns(coco.getAnnIds()):
        coco.annToMask(ann)  # every annotation's mask decodes
    return {"images": len(coco.getImgIds()), "annotations": len(coco.getAnnIds()),
            "categories": len(coco.getCatIds()), "summary": str(summary)}


def log_counts(workers: Sequence[Worker]) -> dict:
    """What the workers' logs say the reapers did: re-sends by reason, poison chunks."""
    text = "".join(w.log_path.read_text(errors="replace") for w in workers if w.log_path.exists())
    reasons = re.findall(r"sending again \(attempt \d+\): (.*)", text)
    by_reason: dict[str, int] = {}
    for reason in reasons:
        key = re.sub(r"\S+@\S+|\b\d+\b", "N", reason.strip())  # node names and pids aside
        by_reason[key] = by_reason.get(key, 0) + 1
    return {"resends": len(reasons), "resends_by_reason": by_reason,
            "poison": len(re.findall(r"poison: sent", text)),
            "internal_errors": len(re.findall(r"internal error", text)),
            # Celery killed a new pool process still loading the models (worker_proc_alive_timeout)
            "pool_starts_killed": len(re.findall(r"Timed out waiting for UP message", text))}


def finish_delays(client, job: str, kills: list[dict]) -> dict:
    """For each kill that caught a chunk mid-task: seconds from the kill (``at``, epoch) to the completion
    record of that chunk, written by whichever worker finished it (``chunk_finished_after_s`` is added to the
    kill). Returns the spread per kind of kill."""
    from datetime import datetime

    from jobs.status import chunk_records

    caught = {k["chunk"] for k in kills if k["chunk"] is not None}
    finished = {r.chunk: datetime.fromisoformat(r.finished).timestamp()
                for r in chunk_records(client.store, job, caught)}
    delays: dict[str, list[float]] = {}
    for kill in kills:
        if kill["chunk"] in finished:
            kill["chunk_finished_after_s"] = round(finished[kill["chunk"]] - kill["at"], 2)
            delays.setdefault(kill["kind"], []).append(kill["chunk_finished_after_s"])
    return {kind: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "n": len(v)}
            for kind, v in delays.items()}
