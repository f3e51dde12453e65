"""Queue benchmark: what the queue costs per image, next to the model time of the same run.

    python bench/queue.py [--images 16] [--batch-sizes 1 4 16] [--repeats 3] [--render] [--out FILE]

What runs for real: a private ``redis-server`` (:func:`bench.servers.private_redis`), one
``celery -A worker worker -Q gpu,cpu --concurrency 1`` process (the README's command) with the bundled
``synth`` SAM and ranker on CPU, a directory store, and the producer's ``QueueClient.submit_segment``.
The inputs are 1024x768 JPEGs: a 3x4 grid of 256-pixel synthetic objects, 12 per image (:func:`make_scenes`).

Each run is one job of ``--images`` images at K images per task on a store emptied of inputs, proposals and
results, so every image is uploaded and segmented from scratch. Its wall time runs from the call to
``submit_segment`` to the moment the job's last completion record is published in the store (the ctime the
publishing rename sets; the client's polling interval is not counted). Per image it is split into:

* **model**: the worker's model stages (``sam``, ``filters``, ``crops``, ``clip_images``, ``clip_text``,
  ``rank``), summed from every image's ``timings_s`` in the chunk records;
* **decode**: decoding the input image (``decode_image``);
* **store I/O**: the producer's upload (timed around ``QueueClient.upload``) and the worker's store reads and
  writes (``check_result``, ``load_cache``, ``read_input``, ``save_proposals``, ``save_embeddings``,
  ``write_result``: each write is one durability barrier);
* **rendering**: encoding the output: the result's JSON (``encode_result``), the proposals' masks as COCO
  RLE (``encode_proposals``, first segment only) and, with ``--render``, the mask and overlay PNGs
  (``decode_masks``, ``render``);
* **queue**: the rest of the wall time: the submit's manifest, registration and first sends, Redis, Celery's
  delivery and acks, the worker's per-chunk bookkeeping (running mark, completion record, top-up) and any
  worker time no stage accounts for. Being the remainder, it leaves nothing out.

Protocol: a warm-up job first (2 other images, same options and prompts: the pipeline is assembled and the
prompts encoded before anything is timed); then ``--repeats`` rounds, each running every K once
(interleaved: 1, 4, 16, 1, 4, 16, ...); per K the median with min and max; the 1-minute load average before
and after each run. Target (issue 11): queue overhead <= 5 ms per image at K = 16.

Writes ``bench/results/queue.json`` (``queue-render.json`` with ``--render``) and prints a table. The
helpers here (scenes, the worker, one timed job, the split) are shared with ``bench/requery.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this file's folder is sys.path[0] and its name would shadow the standard `queue`
# module that redis and kombu import: drop the folder, put the repository root in its place
_HERE, ROOT = Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from datetime import datetime  # noqa: E402
from typing import Callable, Iterator, Sequence  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bench.servers import private_redis  # noqa: E402

SCENE_HW = (768, 1024)  # input images: height, width
GRID = (3, 4)  # objects per image: rows x columns of 256-pixel tiles
PROMPTS = ("circle", "star")
BATCH_SIZES = (1, 4, 16)
TARGET_QUEUE_MS = 5.0  # issue 11: queue overhead per image at 16 images per task
MODEL_STAGES = ("sam", "filters", "crops", "clip_images", "clip_text", "rank")
NESTED_STAGES = ("encode", "decode", "postprocess", "small_regions")  # the generator's, inside "sam"
DECODE_STAGES = ("decode_image",)
STORE_STAGES = ("check_result", "load_cache", "read_input", "save_proposals", "save_embeddings", "write_result")
RENDER_STAGES = ("encode_result", "encode_proposals", "decode_masks", "render")  # output encoding and PNGs
PARTS = ("model", "decode", "store_io", "rendering", "queue")
WORKER_START_S = 300.0


# --- inputs ---------------------------------------------------------------------------------------------


def make_scenes(folder: Path, count: int, *, seed: int = 0, quality: int = 90) -> list[Path]:
    """``count`` 1024x768 JPEGs, each a 3x4 grid of 256-pixel synthetic objects (``slip.data.synth``) drawn
    from the demo's classes; deterministic in ``seed``."""
    from producer.demo import DEMO_PROMPTS, DISTRACTORS
    from slip.data.synth import render_object

    folder.mkdir(parents=True, exist_ok=True)
    names = [*DEMO_PROMPTS, *DISTRACTORS]
    (height, width), (rows, cols) = SCENE_HW, GRID
    tile = min(height // rows, width // cols)
    paths = []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        image = np.zeros((height, width, 3), np.uint8)
        for r in range(rows):
            for c in range(cols):
                image[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = render_object(str(rng.choice(names)), rng, tile)[0]
        path = folder / f"scene_{seed}_{i:04d}.jpg"
        Image.fromarray(image).save(path, quality=quality)
        paths.append(path)
    return paths


# --- the worker -------------------------------------------------------------------------------------------


def worker_env(broker_url: str, store: Path, **overrides: str) -> dict[str, str]:
    """The environment of the worker and the client: synth models on CPU, ``store``, the private Redis."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIP_")}
    env.update(SLIP_BROKER_URL=broker_url, SLIP_STORE=str(store), SLIP_SAM="synth", SLIP_CLIP="synth",
               SLIP_DEVICE="cpu", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.update(overrides)
    return env


@contextmanager
def bench_worker(env: dict[str, str], log_path: Path, *, name: str = "bench",
                 launcher: Sequence[str] | None = None) -> Iterator[dict]:
    """One ``celery -A worker worker -Q gpu,cpu --concurrency 1 -n <name>@%h`` for the block, ready (its
    health report says the models are loaded); yields ``{"node", "health", "process"}``. ``launcher``
    replaces ``celery`` as the command (``bench/requery.py --profile`` runs the worker under cProfile)."""
    from producer.client import QueueClient
    from jobs.settings import Settings

    command = [*(launcher or [sys.executable, "-m", "celery"]), "-A", "worker", "worker", "-Q", "gpu,cpu",
               "--concurrency", "1", "-n", f"{name}@%h"]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    node = f"{name}@{socket.gethostname()}"
    try:
        client = QueueClient(Settings.from_env(env))
        health = _wait_ready(client, node, process, log_path)
        yield {"node": node, "health": health, "process": process}
    finally:
        _stop(process)


def _wait_ready(client, node: str, process: subprocess.Popen, log_path: Path) -> dict:
    from celery.exceptions import TimeoutError as CeleryTimeout

    deadline = time.monotonic() + WORKER_START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            health = client.health(node, timeout_s=5.0)
        except CeleryTimeout:
            continue
        if health.get("models_loaded"):
            return health
        raise RuntimeError(f"worker {node} loaded no models: {health}")
    tail = log_path.read_text(errors="replace")[-3000:]
    raise RuntimeError(f"worker {node} did not become ready (exit code {process.poll()})\n--- worker log ---\n{tail}")


def _stop(process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """Warm shutdown (SIGTERM to the worker's process group), SIGKILL if it lingers."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def clear_store(root: Path, parts: Sequence[str] = ("inputs", "proposals", "results")) -> None:
    """Empty the store of ``parts`` (the worker is idle between runs; job ledgers stay)."""
    for part in parts:
        shutil.rmtree(root / part, ignore_errors=True)


# --- one timed job ----------------------------------------------------------------------------------------


class _Timed:
    """Wraps a callable; adds the seconds spent in it to ``seconds``."""

    def __init__(self, fn: Callable) -> None:
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start



def wait_finished(client, job: str, *, timeout_s: float, poll_s: float) -> float:
    """Poll ``client.status(job)`` until the job is finished; the wall-clock time it was seen finished."""
    deadline = time.monotonic() + timeout_s
    while not (status := client.status(job)).finished:
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job} did not finish within {timeout_s} s: {status.counts}")
        time.sleep(poll_s)
    return time.time()

def run_job(client, paths: Sequence[Path], prompts: Sequence[str], params, *, batch_size: int, store_root: Path,
            poll_s: float = 0.05, timeout_s: float = 3600.0) -> dict:
    """Submit ``paths`` through ``client`` and wait for every completion record; the run's figures
    (:func:`run_submitted`)."""
    return run_submitted(client, lambda: client.submit_segment([str(p) for p in paths], list(prompts), params,
                                                               batch_size=batch_size),
                         images=len(paths), batch_size=batch_size, store_root=store_root, poll_s=poll_s,
                         timeout_s=timeout_s)


def run_submitted(client, submit: Callable[[], str], *, images: int, store_root: Path, batch_size: int | None = None,
                  poll_s: float = 0.05, timeout_s: float = 3600.0) -> dict:
    """Call ``submit()`` (it returns a job id: ``submit_segment``, ``submit_from_job``, ...) and wait for every
    completion record; the run's figures: wall time (the call to the last record published), the upload time
    inside the call, and per stage the seconds the worker reports (``batch_size``: default, the first chunk's)."""
    from jobs.status import chunk_records

    upload = client.upload = _Timed(client.upload)  # the instance attribute shadows the method: create_job calls it
    load_before = os.getloadavg()
    start = time.time()
    try:
        job = submit()
        submitted = time.time()
        seen = wait_finished(client, job, timeout_s=timeout_s, poll_s=poll_s)
    finally:
        del client.upload
    published = max(p.stat().st_ctime for p in (store_root / "jobs" / job / "done").iterdir())
    records = list(chunk_records(client.store, job))
    outcomes = [o for record in records for o in record.items]
    last_finished = max(datetime.fromisoformat(record.finished).timestamp() for record in records)
    bad = [o for o in outcomes if o.state != "done"]
    if bad or len(outcomes) != images:
        raise RuntimeError(f"job {job}: {len(outcomes) - len(bad)} of {images} images done; first failure: "
                           f"{bad[0].reason if bad else 'records missing'}")
    stages: dict[str, float] = {}
    for outcome in outcomes:
        for stage, seconds in outcome.timings_s.items():
            stages[stage] = stages.get(stage, 0.0) + seconds
    return {"job_id": job, "images": images, "batch_size": batch_size or len(records[0].items),
            "wall_s": published - start, "submit_s": submitted - start, "upload_s": upload.seconds,
            "seen_after_s": seen - start, "last_record_write_s": published - last_finished, "tasks": len(records),
            "how": sorted({o.how for o in outcomes}), "stages_s": stages,
            "load1_before": load_before[0], "load1_after": os.getloadavg()[0]}

def split(run: dict) -> dict:
    """Milliseconds per image of ``run`` by part (:data:`PARTS`, summing to ``total``), and the stages no
    part claims (``unclassified``: counted in none, so they show)."""
    stages, n = run["stages_s"], run["images"]
    pick = lambda names: sum(stages.get(s, 0.0) for s in names)  # noqa: E731
    known = set(MODEL_STAGES + NESTED_STAGES + DECODE_STAGES + STORE_STAGES + RENDER_STAGES)
    parts = {"model": pick(MODEL_STAGES), "decode": pick(DECODE_STAGES),
             "store_io": run["upload_s"] + pick(STORE_STAGES), "rendering": pick(RENDER_STAGES)}
    unclassified = {k: v for k, v in stages.items() if k not in known}
    parts["queue"] = run["wall_s"] - sum(parts.values()) - sum(unclassified.values())
    ms = {k: v / n * 1e3 for k, v in parts.items()}
    ms["total"] = run["wall_s"] / n * 1e3
    ms["overhead"] = ms["store_io"] + ms["rendering"] + ms["queue"]
    submit = (run["submit_s"] - run["upload_s"]) / n * 1e3  # manifest, registration, first sends: once per job
    queue = {"submit": submit, "worker_side": ms["queue"] - submit}
    if "last_record_write_s" in run:  # the last completion record's write, a part of worker_side
        queue["last_record_write"] = run["last_record_write_s"] / n * 1e3
    return {"ms_per_image": ms, "queue_ms_per_image": queue,
            "unclassified_ms_per_image": {k: v / n * 1e3 for k, v in unclassified.items()}}


def spread(values: Sequence[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def machine() -> dict:
    return {"cpu_count": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "loadavg": os.getloadavg()}


def segment_params(render: bool, filters: str | None = None):
    """The jobs' options: the synth SAM's recommended generator options and filter chain unless ``filters``
    names another chain (``none``: no filters)."""
    from slip.options import SegmentOptions

    return SegmentOptions(render=render, filters=filters)


# --- the benchmark ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16, help="images per job (1024x768 JPEG)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES), help="K values, images per task")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each runs every K once")
    parser.add_argument("--render", action="store_true", help="also write mask and overlay PNGs (--render)")
    parser.add_argument("--filters", default=None,
                        help="filter chain of the jobs (default: the synth SAM's filters.json chain)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON results (default bench/results/queue.json, queue-render.json with --render)")
    parser.add_argument("--resummarise", type=Path, default=None, metavar="JSON",
                        help="measure nothing: re-derive the split and the summary of a results file from its runs' "
                             "recorded figures, and write it back")
    args = parser.parse_args(argv)
    if args.resummarise is not None:
        result = json.loads(args.resummarise.read_text())
        result = summarise(result, [{k: v for k, v in run.items() if k not in SPLIT_KEYS} for run in result["runs"]])
        args.resummarise.write_text(json.dumps(result, indent=1) + "\n")
        print(table(result))
        return 0
    if shutil.which("redis-server") is None:
        parser.error("redis-server is not installed (apt-get install redis-server)")
    out = args.out or ROOT / "bench" / "results" / ("queue-render.json" if args.render else "queue.json")

    from producer.client import QueueClient
    from jobs.settings import Settings

    params = segment_params(args.render, args.filters)
    before = machine()
    with tempfile.TemporaryDirectory(prefix="slip-bench-queue-", dir=args.workdir) as tmp:
        work = Path(tmp)
        paths = make_scenes(work / "images", args.images, seed=1)
        warm = make_scenes(work / "warm", 2, seed=2)
        store = work / "store"
        with private_redis() as url:
            env = worker_env(url, store)
            with bench_worker(env, work / "worker.log") as worker:
                client = QueueClient(Settings.from_env(env))
                warmup = run_job(client, warm, PROMPTS, params, batch_size=1, store_root=store)
                runs = []
                for repeat in range(args.repeats):
                    for k in args.batch_sizes:
                        clear_store(store)
                        run = {**run_job(client, paths, PROMPTS, params, batch_size=k, store_root=store), "repeat": repeat}
                        runs.append(run)
                        print(f"K={k:2d} round {repeat}: " + ", ".join(
                            f"{part} {v:.1f}" for part, v in split(run)["ms_per_image"].items()) + " ms/image", flush=True)
    result = {
        "what": "queue overhead per image through a real worker (synth models, CPU), split by part; see bench/queue.py",
        "machine": {**before, "loadavg_after": os.getloadavg()},
        "settings": {"images": args.images, "image": f"{SCENE_HW[1]}x{SCENE_HW[0]} JPEG, 3x4 synthetic objects",
                     "models": "synth (SAM) + synth (ranker), CPU", "prompts": list(PROMPTS),
                     "params": params.model_dump(mode="json"), "batch_sizes": args.batch_sizes,
                     "repeats": args.repeats, "worker": "celery -A worker worker -Q gpu,cpu --concurrency 1",
                     "worker_threads": worker["health"].get("threads"), "render": args.render},
        "warmup": {k: warmup[k] for k in ("wall_s", "images", "how")},
    }
    result = summarise(result, runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"\nwritten: {out}")
    return 0


SPLIT_KEYS = ("ms_per_image", "queue_ms_per_image", "unclassified_ms_per_image")  # derived by split()


def summarise(result: dict, runs: list[dict]) -> dict:
    """``result`` with ``runs`` (their recorded figures) split (:func:`split`), and per K the median, min and
    max of every part, of the queue's sub-parts, and the target's verdict."""
    runs = [{**run, **split(run)} for run in runs]
    summary, queue = {}, {}
    for k in sorted({run["batch_size"] for run in runs}):
        mine = [r for r in runs if r["batch_size"] == k]
        summary[f"k{k}"] = {part: spread([r["ms_per_image"][part] for r in mine]) for part in (*PARTS, "overhead", "total")}
        queue[f"k{k}"] = {part: spread([r["queue_ms_per_image"][part] for r in mine]) for part in mine[0]["queue_ms_per_image"]}
    met = summary.get("k16", {}).get("queue", {}).get("median", float("inf")) <= TARGET_QUEUE_MS
    return {**result, "runs": runs, "summary_ms_per_image": summary, "queue_split_ms_per_image": queue,
            "target": {"queue_ms_per_image_at_k16": TARGET_QUEUE_MS, "met": met}}


def table(result: dict) -> str:
    """The summary as text: per K, each part's median [min, max] in ms per image."""
    settings = result["settings"]
    lines = [f"{settings['images']} images {settings['image']}, {settings['models']}, render={settings['render']}, "
             f"{settings['repeats']} rounds; ms per image, median [min, max]"]
    header = ["K", *PARTS, "overhead", "total"]
    lines.append("  ".join(f"{h:>20}" for h in header))
    for key, parts in result["summary_ms_per_image"].items():
        cells = [key[1:]] + [f"{p['median']:.1f} [{p['min']:.1f}, {p['max']:.1f}]" for p in
                             (parts[h] for h in header[1:])]
        lines.append("  ".join(f"{c:>20}" for c in cells))
    for key, parts in result.get("queue_split_ms_per_image", {}).items():
        lines.append(f"K={key[1:]} queue = " + " + ".join(
            f"{name} {p['median']:.1f} [{p['min']:.1f}, {p['max']:.1f}]" for name, p in parts.items()
            if name != "last_record_write") + " ms/image")
    load = result["machine"]
    lines.append(f"load average (1 min): {load['loadavg'][0]:.1f} before, {load['loadavg_after'][0]:.1f} after; "
                 f"target queue <= {TARGET_QUEUE_MS} ms/image at K=16: {'met' if result['target']['met'] else 'NOT met'}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
