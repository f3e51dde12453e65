"""Bulk-job benchmark of the control plane: tiny synthetic images by the 10k and 100k, no model work.

    python bench/bulk.py [--sizes 10000 100000] [--root /dev/shm/slip-bulk] [--out bench/results/bulk.json]

For each size N it measures what a 100k-image user meets before any GPU work:

* **submit**: ``QueueClient.submit_segment`` (hash, upload, manifest pages, registration, first window):
  wall time and per-image cost; the issue's target is per-image cost at 100k <= 1.3x that at 10k;
* **Redis memory**: ``used_memory`` of a private ``redis-server`` after the submit and at its peak while
  the job runs (target: bounded by the in-flight window, not by N), with its parts at the peak (the keys'
  ``used_memory_dataset``, the connections' ``mem_clients_normal``, the number of keys);
* **manifest size**: bytes of ``manifest.json`` + the item pages;
* **status**: wall time of ``QueueClient.status`` on the finished job (median of 5 polls; target <= 2 s on
  a local store) and the store requests of one poll on S3 (moto's server on loopback; target <= 100);
* **export**: ``export_items`` + ``write_export(format="coco")`` in a child process: wall time and peak RSS
  (it must not grow with N).

What runs for real: the producer's submit, a private Redis, the directory store (``--root``; /dev/shm by
default so the disk's flush time does not hide the control plane's own cost) and moto's S3 server,
status, export. What does not: no Celery worker and no model. The bench plays the worker: it takes each
``slip.segment`` message off the ``gpu`` queue through kombu's public consumer API (``SimpleQueue``, in the
order a worker is served) and runs the real :func:`worker.tasks.run_chunk` on it — running mark, completion
record, finish, top-up — with a stand-in unit that writes a one-segment ``segments.json`` per image instead
of the model work.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from datetime import datetime, timezone  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bench.servers import private_redis  # noqa: E402

WINDOW = 32  # chunks in flight (the CLI's default --max-in-flight)
BATCH = 4  # images per chunk (the CLI's default --batch-size)
PROMPT = "object"


def make_images(folder: Path, count: int) -> Path:
    """``count`` distinct 8x8 PNGs (made once per folder and reused)."""
    marker = folder / f".complete-{count}"
    if marker.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:06d}.png")
    marker.touch()
    return folder


def stand_in_request():
    """The resolved request recorded in every stand-in result (no model ran: the digests say so)."""
    from slip.request import ModelRef, SegmentOptions, resolve

    none = ModelRef(spec="none", arch="none (bench/bulk.py: no model work)", sha256="0" * 64)
    return resolve(SegmentOptions(), sam=none, sam_generator={}, sam_filters=None, ranker=none, ranker_threshold=None)


def stand_in_unit(request):
    """A segment unit without model work: a one-segment ``segments.json`` for the image (the processor
    signature of :data:`worker.tasks.PROCESSORS`)."""
    import torch

    from jobs.model import ItemOutcome
    from jobs.segment import SegmentSpec
    from slip.outputs import encode_rle, result_document
    from slip.types import Match
    from worker.processing import result_key

    mask = np.zeros((1, 8, 8), bool)
    mask[0, 2:6, 2:6] = True
    segment = {"id": 0, "segmentation": encode_rle(mask)[0], "bbox": [2.0, 2.0, 4.0, 4.0], "area": 16,
               "predicted_iou": 1.0, "stability_score": 1.0, "point_coords": [4.0, 4.0], "crop_box": [0.0, 0.0, 8.0, 8.0]}
    match = Match(prompt=PROMPT, instances=((0, 0.5),), best=(0, 0.5), threshold=None, top_k=((0, 0.5),))

    def unit(res, manifest, item, **_):
        spec = SegmentSpec.model_validate(manifest.spec)
        prefix = result_key(item, request, spec)
        doc = result_document(image_size=(8, 8), prompts=spec.prompts, request=request, segments=[segment],
                              similarity=torch.tensor([[0.5]]), matches=[match], generated=1, filters=[], timings={},
                              runtime={"note": "bench/bulk.py stand-in: no model work"})
        res.store.put_many({f"{prefix}/segments.json": json.dumps(doc).encode()})
        return ItemOutcome(index=item.index, state="done", result_key=prefix, how="computed", found=[1])

    return unit


def take_message(queue) -> dict | None:
    """The next message's kwargs on the ``gpu`` queue (kombu ``SimpleQueue``: a worker's order), acked."""
    try:
        message = queue.get(block=True, timeout=0.05)
    except queue.Empty:
        return None
    _, kwargs, _ = message.decode()
    message.ack()
    return kwargs


def used_memory(client) -> int:
    return int(client.board.r.info("memory")["used_memory"])


def memory_parts(client) -> dict:
    """Where Redis's ``used_memory`` goes: the keys (``used_memory_dataset``), the client connections' buffers
    (``mem_clients_normal``: grows with connections, not with jobs), the number of keys and the largest keys
    (``MEMORY USAGE``, bytes)."""
    r = client.board.r
    info = r.info("memory")
    largest = sorted(((int(r.memory_usage(k) or 0), k.decode(errors="replace")) for k in r.scan_iter(count=100)),
                     reverse=True)[:8]
    return {"used_memory": int(info["used_memory"]), "dataset": int(info["used_memory_dataset"]),
            "clients": int(info["mem_clients_normal"]), "keys": int(r.dbsize()),
            "largest_keys": {k: n for n, k in largest}}


def run_job(client, folder: Path) -> dict:
    """Submit, play the workers until the job is finished, read its status; the figures."""
    from jobs.broker import MODEL_QUEUE
    from worker.resources import load_resources
    from worker.tasks import run_chunk

    before, before_parts = used_memory(client), memory_parts(client)
    start = time.perf_counter()
    job = client.submit_segment([folder], [PROMPT], {}, batch_size=BATCH, max_in_flight=WINDOW)
    submit_s = time.perf_counter() - start
    after_submit = used_memory(client)
    res = load_resources(client.settings, load_models=False, send=client.send, instance="bulk-bench")
    processors = {"segment": stand_in_unit(stand_in_request())}
    peak, chunks, at_peak = after_submit, 0, memory_parts(client)
    start = time.perf_counter()
    with client.app.connection_for_read() as connection, connection.SimpleQueue(MODEL_QUEUE) as queue:
        while (message := take_message(queue)) is not None:
            run_chunk(res, message["job"], message["chunk"], message["attempt"], task_id="bench", node="bench",
                      processors=processors)
            chunks += 1
            if chunks % 500 == 0 and (now := memory_parts(client))["used_memory"] > peak:
                peak, at_peak = now["used_memory"], now
    complete_s = time.perf_counter() - start
    res.close()
    status = client.status(job)
    assert status.counts["done"] == status.manifest.total, status.counts
    polls = []
    for _ in range(5):
        t0 = time.perf_counter()
        client.status(job)
        polls.append(time.perf_counter() - t0)
    return {"job": job, "submit_s": submit_s, "redis_before_bytes": before, "redis_after_submit_bytes": after_submit,
            "redis_peak_bytes": peak, "redis_at_peak": at_peak, "redis_after_job_bytes": used_memory(client),
            "redis_before_parts": before_parts, "complete_s": complete_s,
            "status_s": _spread(polls), "counts": status.counts}


def manifest_bytes(store_root: Path, job: str) -> int:
    folder = store_root / "jobs" / job
    return sum(p.stat().st_size for p in [folder / "manifest.json", *(folder / "items").glob("*.json")])


def export_in_child(broker: str, store: str, job: str, out: Path) -> dict:
    """``slip results --format coco`` work in a fresh process: wall time and peak RSS."""
    code = (
        "import json, sys, time; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
        "from producer.client import QueueClient; from producer.exports import write_export;"
        "from jobs.settings import Settings; s = Settings(broker_url=sys.argv[2], store=sys.argv[3]);"
        "c = QueueClient(s); t = time.perf_counter();"
        "r = write_export(c.export_items(sys.argv[4]), format='coco', out=Path(sys.argv[5]), prompts=['object'], job_id=sys.argv[4]);"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1];"
        "print(json.dumps({'seconds': time.perf_counter() - t, 'peak_rss_bytes': int(hwm) * 1024}))"
    )  # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so it would report the forking bench's size
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT), broker, store, job, str(out)], capture_output=True,
                          text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def s3_status_cost(broker: str, local: Path, job: str) -> dict:
    """Copy the job's ledger to moto's S3 server, then count the store requests of one status poll."""
    sys.path.insert(0, str(ROOT / "tests"))
    from s3_server import S3Server, count_s3_requests

    from jobs.settings import Settings
    from producer.client import QueueClient

    with S3Server() as server:
        os.environ.update(server.env)
        client = QueueClient(Settings(broker_url=broker, store=server.store_url("bulk")))
        files = [p for p in (local / "jobs" / job).rglob("*") if p.is_file()]
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda p: client.store.put_bytes(p.relative_to(local).as_posix(), p.read_bytes()), files))
        client.status(job)  # warm
        with count_s3_requests(client.store) as counts:
            t0 = time.perf_counter()
            status = client.status(job)
            seconds = time.perf_counter() - t0
        return {"requests": dict(counts), "requests_total": sum(counts.values()), "seconds": seconds,
                "ledger_objects": len(files), "done": status.counts["done"]}


def bench_size(n: int, root: Path) -> dict:
    from jobs.settings import Settings
    from producer.client import QueueClient

    folder = make_images(root / f"images-{n}", n)
    store_root = root / f"store-{n}"
    shutil.rmtree(store_root, ignore_errors=True)
    with private_redis() as broker:
        client = QueueClient(Settings(broker_url=broker, store=str(store_root)))
        figures = run_job(client, folder)
        figures["manifest_bytes"] = manifest_bytes(store_root, figures["job"])
        figures["export_coco"] = export_in_child(broker, str(store_root), figures["job"], root / f"export-{n}.json")
        figures["s3_status"] = s3_status_cost(broker, store_root, figures["job"])
    figures["images"] = n
    figures["submit_ms_per_image"] = 1000 * figures["submit_s"] / n
    return figures


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--root", type=Path, default=Path("/dev/shm/slip-bulk"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/bulk.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    results = {str(n): bench_size(n, args.root) for n in args.sizes}
    small, large = str(min(args.sizes)), str(max(args.sizes))
    report = {
        "command": "python bench/bulk.py " + " ".join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg(), "store_root": str(args.root)},
        "what_ran": "producer submit, private redis-server, directory store and moto S3, status, export; the bench "
                    "played the workers' control-plane part (no model work): see the module docstring",
        "window_chunks": WINDOW, "batch_size": BATCH, "sizes": results,
        "submit_cost_ratio": results[large]["submit_ms_per_image"] / results[small]["submit_ms_per_image"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    for n, r in results.items():
        print(f"{int(n):>7} images: submit {r['submit_s']:.1f} s ({r['submit_ms_per_image']:.2f} ms/image), "
              f"Redis peak {r['redis_peak_bytes'] / 2**20:.2f} MiB (before {r['redis_before_bytes'] / 2**20:.2f}), "
              f"manifest {r['manifest_bytes'] / 2**20:.1f} MiB, status {r['status_s']['median']:.3f} s local / "
              f"{r['s3_status']['requests_total']} S3 requests, export {r['export_coco']['seconds']:.1f} s "
              f"peak RSS {r['export_coco']['peak_rss_bytes'] / 2**20:.0f} MiB")
    print(f"submit per-image cost {large} vs {small}: x{report['submit_cost_ratio']:.2f}; wrote {args.out}")


if __name__ == "__main__":
    main()
