"""What the dashboard costs on a finished 100,000-image job: wall time and S3 requests of the page and of
``/metrics``.

    python bench/dashboard.py [--images 100000] [--batch-size 64] [--repeats 5] [--out bench/results/dashboard.json]
    # ~1 min on 2 CPU cores at 100,000 images (most of it writing the job's ledger to moto's S3)

The job is written with the job model's own functions, as a finished run leaves it (:func:`finished_job`):
the manifest and its item pages, one completion record per chunk with a permanent failure every
``--failed-every`` images, each chunk begun and finished on the board (Redis), the job closed and its
``summary.json`` written (:func:`jobs.view.summarize`, as the worker that finishes a job does). The store is
moto's S3 server on loopback, Redis a private ``redis-server``.

Each measurement serves one request through the real HTTP server (:func:`producer.dashboard.make_server`,
in-process) of a fresh :class:`producer.dashboard.Dashboard` (nothing cached), counting the S3 requests its
store sends. ``page`` and ``metrics`` alternate (A/B/A/B) after one warm-up each; figures are medians with
[min, max] over ``--repeats`` rounds; the load average is recorded. ``forgotten``: the same after Redis lost
the job's keys (the page then reads the store's job listing and the summary). Targets (issue 15): each
<= 2 s and <= 100 store requests. Writes ``bench/results/dashboard.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from datetime import datetime, timezone  # noqa: E402

import requests  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "dashboard.json"
AUTH = ("bench", "bench-password")
REASON = "<9 bytes> is not an image in a format PIL can read (PNG, JPEG, ...)"


def finished_job(client, *, images: int, batch_size: int = 64, failed_every: int = 997) -> str:
    """A finished segment job of ``images`` images in ``client``'s store and Redis; its id."""
    from jobs.ledger import record_chunk, write_job
    from jobs.model import ChunkRecord, Item, ItemOutcome, JobManifest, new_job_id
    from jobs.view import summarize

    job = new_job_id()
    items = [Item(index=i, image_key=f"inputs/{_sha(job, i)}.png", image_sha=_sha(job, i), name=f"d{i // 1000:03d}/{i:06d}.png")
             for i in range(images)]
    manifest = JobManifest(job_id=job, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           spec={"prompts": ["a red box"], "sam": "tiny-random", "clip": "tiny-random"},
                           batch_size=batch_size, total=images, page_size=JobManifest.page_size_for(batch_size))
    write_job(client.store, manifest, items)
    board = client.board
    board.register(job, kind="segment", chunks=manifest.chunks, total=images, window=32, created=time.time())

    def run(chunk: int) -> None:
        outcomes = [ItemOutcome(index=i, state="failed", permanent=True, reason=REASON, error="ImageError")
                    if i % failed_every == failed_every - 1 else
                    ItemOutcome(index=i, state="done", result_key=f"results/{items[i].image_sha}/{'0' * 64}",
                                how="computed", found=[1]) for i in manifest.chunk_range(chunk)]
        record = ChunkRecord(job_id=job, chunk=chunk, task_id=f"t{chunk}", worker="bench@host",
                             finished=datetime.now(timezone.utc).isoformat(), items=outcomes)
        mark = json.dumps({"attempt": 0, "worker": "bench", "node": "bench@host", "at": time.time()})
        board.begin(job, chunk, 0, mark)
        record_chunk(client.store, record, replace_earlier=False)
        failed = sum(o.state == "failed" for o in outcomes)
        board.finish(job, chunk, 0, mark, again=False, done=len(outcomes) - failed, failed=failed)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(run, range(manifest.chunks)))
    board.close(job, keep_s=3600)
    summarize(board, client.store, job, dead_after_s=client.settings.dead_after_s)
    return job


def _sha(job: str, i: int) -> str:
    return hashlib.sha256(f"{job}-{i}".encode()).hexdigest()


def serve_once(client, path: str, *, count) -> dict:
    """One GET of ``path`` from a fresh dashboard: seconds, S3 requests, status and body size."""
    from producer.dashboard import Dashboard, DashboardConfig, make_server

    config = DashboardConfig(credentials=(f"{AUTH[0]}:{AUTH[1]}",), port=0)
    dashboard = Dashboard(client, config)
    server = make_server(dashboard)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with count(client.store) as counts:
            start = time.perf_counter()
            response = requests.get(f"http://127.0.0.1:{server.server_address[1]}{path}", auth=AUTH, timeout=60)
            seconds = time.perf_counter() - start
        return {"seconds": seconds, "requests": sum(counts.values()), "by_operation": dict(counts),
                "status": response.status_code, "bytes": len(response.content), "text": response.text}
    finally:
        server.shutdown()
        server.server_close()
        dashboard.close()


def measure(client, *, repeats: int, count) -> dict:
    """``page`` and ``metrics`` alternated, one warm-up each; medians with [min, max]."""
    runs: dict[str, list[dict]] = {"page": [], "metrics": []}
    paths = {"page": "/", "metrics": "/metrics"}
    for name in runs:
        serve_once(client, paths[name], count=count)
    for _ in range(repeats):
        for name in runs:
            runs[name].append(serve_once(client, paths[name], count=count))
    return {name: _figures(values) for name, values in runs.items()}


def _figures(runs: list[dict]) -> dict:
    seconds = [r["seconds"] for r in runs]
    requests_ = [r["requests"] for r in runs]
    return {"seconds_median": statistics.median(seconds), "seconds_range": [min(seconds), max(seconds)],
            "store_requests_median": statistics.median(requests_), "store_requests_range": [min(requests_), max(requests_)],
            "by_operation": runs[-1]["by_operation"], "status": runs[-1]["status"], "bytes": runs[-1]["bytes"],
            "repeats": len(runs)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=100_000)
    p.add_argument("--batch-size", type=int, default=64, help="images per chunk (1..64)")
    p.add_argument("--failed-every", type=int, default=997, help="one permanent failure every N images")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    sys.path.insert(0, str(ROOT / "tests"))
    from s3_server import S3Server, count_s3_requests

    from bench.servers import private_redis
    from jobs.settings import Settings
    from producer.client import QueueClient

    with S3Server() as server, private_redis() as broker:
        os.environ.update(server.env)
        client = QueueClient(Settings(broker_url=broker, store=server.store_url("dashboard")))
        start = time.perf_counter()
        job = finished_job(client, images=args.images, batch_size=args.batch_size, failed_every=args.failed_every)
        written_s = time.perf_counter() - start
        load_before = os.getloadavg()
        known = measure(client, repeats=args.repeats, count=count_s3_requests)
        client.board.r.flushdb()  # Redis lost the job: the page lists it from the store
        forgotten = measure(client, repeats=args.repeats, count=count_s3_requests)
        row = client.job(job)
    result = {"images": args.images, "batch_size": args.batch_size, "job_write_s": written_s,
              "row": {"done": row.done, "failed": row.failed, "state": row.state},
              "redis_knows_the_job": known, "redis_lost_the_job": forgotten,
              "targets": {"seconds": 2.0, "store_requests": 100},
              "load_average": {"before": load_before, "after": os.getloadavg()},
              "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for case in ("redis_knows_the_job", "redis_lost_the_job"):
        for name, f in result[case].items():
            print(f"{case:20s} {name:8s} {f['seconds_median']:.3f} s [{f['seconds_range'][0]:.3f}, "
                  f"{f['seconds_range'][1]:.3f}], {f['store_requests_median']:.0f} store requests")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
