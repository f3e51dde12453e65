"""Chaos benchmark: a bulk job that must finish exactly once while its workers, its Redis and its producer die.

    python bench/chaos.py --images 1000 --workers 2 --kills 10 [--kill-every 10 40] [--redis-down 5 30]
                          [--kill-producer at-id|registered|fed] [--side-jobs] [--baseline]
                          [--out bench/results/chaos-1000.json]

Everything is real and runs with the queue's **default settings** (``SLIP_DEAD_AFTER`` 10 s, a reaper beat
every 1.7 s, ``SLIP_LOST_AFTER`` 30 s, ``SLIP_MAX_ATTEMPTS`` 3, visibility timeout 3600 s, batch size 4, 32
chunks in flight):

* a private ``redis-server`` on a free port with an append-only file fsynced on every write
  (``appendfsync always``), and a directory store, both in a temporary folder;
* N tiny synthetic PNGs (distinct), segmented by the ``tiny-random`` models with a SAM grid that costs
  about 0.2-0.5 s per image on one core (:data:`SEGMENT_ARGS`);
* W workers, the production command (``celery -A worker worker -Q gpu,cpu --concurrency 1``), under a
  supervisor loop that restarts a worker whose main process died, 1 s later (as systemd or Kubernetes
  would);
* the producer, ``slip submit segment`` as a subprocess, SIGKILLed the moment it prints the job id
  (``--kill-producer at-id``: the producer prints it once the job is registered and its first window sent),
  or once Redis has the job (``registered``), or once its first chunks are claimed (``fed``);
* with ``--side-jobs``, a training job (a 2-cell grid) and an evaluation job submitted beside it, on the same
  workers and under the same faults: both must finish, as ``slip status JOB --json`` reports;
* K SIGKILLs, one every 10-40 s at random, alternately of a whole worker (``killpg``: main process and
  pool, as when a machine dies) and of a worker's pool process alone (as the OOM killer does; ``--kinds``
  picks one kind only); a kill
  waits (a few seconds at most) for a victim that holds a chunk of the job in
  ``slip:job:<id>:running``, so nearly all land mid-task;
* one SIGKILL of Redis halfway through the kills, restarted from its AOF on the same port 5-30 s later.

Nobody retries anything by hand: the bench has no code path that calls ``slip retry``. When the job's
status says it is finished, the bench checks the store (:func:`verify`): every image has exactly one
result (``results/<image sha>/<digest>/segments.json``, one digest per image), each parseable with every
mask decodable; no torn result (a result folder without a readable ``segments.json``); how many
temporary files a killed writer left (``.tmp/``: hidden, never read, swept by the reapers once their writer
is gone); the COCO export loads in ``pycocotools``; for each kill that caught a chunk, the seconds until that
chunk's completion record was written (target: 30 s for whole-worker and pool-process kills alike). The wall time runs from the
job id (the job exists) to the first status poll that finds it finished. With ``--baseline`` it also runs
the same job undisturbed and reports the ratio of the wall times (target: at most 1.5).

Prints one summary line and writes the figures as JSON (``bench/results/chaos-<N>.json``). The process
helpers here (:class:`RedisServer`, :class:`Worker`, :class:`Supervisor`, :func:`submit`, :func:`verify`)
are also used by ``tests/queue/test_chaos_short.py``, ``test_unattended.py`` and ``test_status_cost.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script this file's folder is sys.path[0], and bench/queue.py would shadow the standard `queue`
# module that redis and kombu import: drop the folder, put the repository root in its place
_HERE, ROOT = Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE and p != str(ROOT)]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Callable, Sequence  # noqa: E402

import redis  # noqa: E402

from bench.chaos_checks import (  # noqa: E402,F401  (re-exported: the tests import them from here)
    PROMPT, Poll, Submitted, coco_check, finish_delays, holder_of, log_counts, make_images, running, submit,
    temporaries, verify, wait_finished,
)
from bench.processes import (  # noqa: E402,F401  (re-exported: the tests import them from here)
    RedisServer, Supervisor, Worker, children_of, client_for, node_name, stop_all, wait_ready, worker_env,
)

# tiny-random SAM: a 12 x 12 point grid with every proposal kept and no filter (the default containment filter
# drops the one or two segments it finds: no mask left to check) costs ~0.2-0.5 s per image on one core
SEGMENT_ARGS = ("--points-per-side", "12", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
                "--filters", "none")
TARGET_RATIO = 1.5  # the target: wall time under chaos at most 1.5 x the undisturbed run


# ---------------------------------------------------------------------------------------------- chaos


@dataclass
class Plan:
    """The faults of one run."""

    kills: int = 10  # worker SIGKILLs
    kill_every: tuple[float, float] = (10.0, 40.0)  # seconds between kills, uniform
    redis_down: tuple[float, float] | None = (5.0, 30.0)  # Redis SIGKILL + AOF restart after this long; None: no
    redis_after_kill: int | None = None  # the Redis restart follows this kill (default: half of them)
    mid_task_wait_s: float = 8.0  # how long a kill waits for a victim that holds a chunk
    kinds: tuple[str, ...] = ("main", "pool")  # what the kills take, in turn: "main" (the machine) or "pool"
    seed: int = 0


class Chaos:
    """The fault thread: kills workers (alternately whole and pool-only) and restarts Redis once."""

    def __init__(self, plan: Plan, *, job: str, workers: Sequence[Worker], server: RedisServer) -> None:
        self.plan = plan
        self.job = job
        self.workers = list(workers)
        self.server = server
        self.rng = random.Random(plan.seed)
        self.kills: list[dict] = []
        self.redis: list[dict] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos", daemon=True)
        self._start = time.monotonic()

    def start(self) -> "Chaos":
        self._start = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def _run(self) -> None:
        redis_after = self.plan.redis_after_kill if self.plan.redis_after_kill is not None else self.plan.kills // 2
        kinds = list(self.plan.kinds)
        self.rng.shuffle(kinds)
        r = self.server.client(socket_timeout=5, socket_connect_timeout=2)
        try:
            for k in range(self.plan.kills):
                if self._stop.wait(self.rng.uniform(*self.plan.kill_every)):
                    return
                try:
                    self._kill(r, kinds[k % len(kinds)])
                except Exception as e:  # noqa: BLE001 (a fault thread never dies of a fault)
                    self.errors.append(f"kill {k}: {type(e).__name__}: {e}")
                if self.plan.redis_down is not None and k + 1 == max(1, redis_after) and not self._stop.is_set():
                    self._restart_redis()
        finally:
            r.close()

    def _kill(self, r: redis.Redis, kind: str) -> None:
        # a victim that holds a chunk now, preferably one not hit before: the same chunk killed on every
        # delivery is what the poison guard (SLIP_MAX_DELIVERIES) is for, not what random faults do
        deadline = time.monotonic() + self.plan.mid_task_wait_s
        hit = frozenset(k["chunk"] for k in self.kills if k["chunk"] is not None)
        target = None
        while time.monotonic() < deadline and not self._stop.is_set():
            try:
                target = holder_of(r, self.job, self.workers, pool=kind == "pool", avoid=hit)
            except redis.exceptions.RedisError:
                target = None
            if target is not None and (target[1] not in hit or time.monotonic() > deadline - 1.0):
                break
            time.sleep(0.1)
        if self._stop.is_set():
            return
        if target is None:  # nobody holds a chunk right now: kill a live worker anyway
            live = [w for w in self.workers if w.alive]
            if not live:
                return
            worker, chunk = self.rng.choice(live), None
        else:
            worker, chunk = target
        with worker.lock:
            if not worker.alive:
                return
            pids = [worker.pid]
            if kind == "main":
                pids += worker.pool_pids()
                worker.kill_main()
            else:
                pids = worker.kill_pool()
        self.kills.append({"t": round(time.monotonic() - self._start, 2), "at": time.time(), "kind": kind,
                           "worker": worker.name, "pids": pids, "mid_task": chunk is not None, "chunk": chunk})

    def _restart_redis(self) -> None:
        down = self.rng.uniform(*self.plan.redis_down)
        t = time.monotonic() - self._start
        self.server.kill()
        self._stop.wait(down)  # the outage lasts even if the job is asked to stop
        self.server.start()
        self.server.restarts += 1
        self.redis.append({"t": round(t, 2), "down_s": round(down, 2)})


def registered(r: redis.Redis, job: str, *, fed: bool = False, timeout_s: float = 30.0) -> float:
    """Seconds until the cluster has ``job`` (``slip:job:<id>`` exists) and, with ``fed``, until its first
    chunks are claimed (``next`` moved); RuntimeError after ``timeout_s``."""
    start = time.monotonic()

    def ready() -> bool:
        return bool(r.exists(f"slip:job:{job}")) and (not fed or int(r.hget(f"slip:job:{job}", "next") or 0) > 0)

    while not ready():
        if time.monotonic() - start > timeout_s:
            raise RuntimeError(f"job {job} was not {'fed' if fed else 'registered'} in Redis within {timeout_s} s")
        time.sleep(0.002)
    return time.monotonic() - start


SIDE_DATASET = {"classes": 4, "per_class": 8, "size": 32}  # a tiny synthetic labelled folder
SIDE_JOBS = {  # `slip submit ...` arguments after the dataset: seconds of CPU each
    "train": ["--grid", "lr=1e-3,1e-2", "--image-backbone", "test_resnet", "--random-image", "--text-encoder",
              "tiny-random", "--random-text", "--image-size", "32", "--epochs", "1", "--batch-size", "8"],
    "evaluate": ["--ranker", "tiny-random", "--composites", "8", "--chunk", "2", "--tile-size", "32"],
}


def submit_side_jobs(env: dict[str, str], folder: Path) -> dict[str, str]:
    """A training and an evaluation job on a tiny synthetic dataset (``slip submit``, no --wait): kind -> id."""
    import subprocess

    from slip.data.synth import generate_dataset

    dataset = generate_dataset(folder / "dataset", seed=0, **SIDE_DATASET)
    ids = {}
    for kind, args in SIDE_JOBS.items():
        done = subprocess.run([sys.executable, "-m", "producer", "submit", kind, str(dataset), *args], env=env,
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"slip submit {kind} failed: {done.stderr[-2000:]}")
        ids[kind] = done.stdout.strip().splitlines()[0]
    return ids


def side_job_reports(env: dict[str, str], client, ids: dict[str, str], *, timeout_s: float) -> dict[str, dict]:
    """Wait for the side jobs, then what `slip status JOB --json` says of each."""
    import subprocess

    reports = {}
    for kind, job in ids.items():
        wait_finished(client, job, timeout_s=timeout_s, poll_s=2.0)
        done = subprocess.run([sys.executable, "-m", "producer", "status", job, "--json"], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        reports[kind] = json.loads(done.stdout) if done.stdout.strip() else {"error": done.stderr[-2000:]}
    return reports


def run(images: Sequence[Path], *, workdir: Path, workers: int = 2, plan: Plan | None = None,
        submit_args: Sequence[str] = (), timeout_s: float = 3600.0, coco: bool = True,
        settle_s: float = 5.0, kill_producer: str = "at-id", side_jobs: bool = False,
        progress: Callable[[str], None] | None = None) -> dict:
    """One run: a private Redis, ``workers`` supervised workers, the producer SIGKILLed the moment it prints
    the job id (``kill_producer="at-id"``, the issue's scenario), once the job is registered in Redis
    (``"registered"``) or once its first chunks are claimed (``"fed"``), the faults of ``plan`` (None:
    undisturbed), with ``side_jobs`` a training and an evaluation job beside it, then :func:`verify`. The
    figures as a dict."""
    say = progress or (lambda text: None)
    workdir.mkdir(parents=True, exist_ok=True)
    server = RedisServer(workdir / "redis").start()
    store = workdir / "store"
    env = worker_env(server.url(), store)
    pool = [Worker(f"chaos{i}", env, workdir) for i in range(workers)]
    supervisor = Supervisor(pool)
    chaos = None
    try:
        for worker in pool:
            worker.start()
        client = client_for(env)
        wait_ready(client, pool)
        supervisor.start()
        say(f"{workers} workers ready; submitting {len(images)} images")

        load_before = os.getloadavg()
        start = time.monotonic()
        folder = images[0].parent
        r = server.client()
        waited = []
        hook = None if kill_producer == "at-id" else (
            lambda job: waited.append(registered(r, job, fed=kill_producer == "fed")))
        submitted = submit(env, folder, [*SEGMENT_ARGS, *submit_args], kill=True, before_kill=hook,
                           log=workdir / "submit.err")
        r.close()
        say(f"job {submitted.job_id} (producer SIGKILLed {submitted.seconds:.1f} s after its start)")
        job_start = time.monotonic()  # the job exists from here: the wall time is the job's, not the upload's
        if plan is not None:
            chaos = Chaos(plan, job=submitted.job_id, workers=pool, server=server).start()
        side = submit_side_jobs(env, workdir) if side_jobs else {}
        status, poll = wait_finished(client, submitted.job_id, timeout_s=timeout_s, poll_s=2.0, start=job_start)
        wall = time.monotonic() - job_start
        time_to_finish = time.monotonic() - start
        if chaos is not None:
            chaos.stop()
        load_after = os.getloadavg()
        first = status.summary() if status is not None else None
        say(f"finished in {wall:.1f} s: {first}")
        # a moment for what is still queued (re-sends) to land, then the final word
        time.sleep(settle_s)
        final, _ = wait_finished(client, submitted.job_id, timeout_s=60, poll_s=1.0)
        side_reports = side_job_reports(env, client, side, timeout_s=600) if side else {}
        checks = verify(client, submitted.job_id)
        delays = finish_delays(client, submitted.job_id, chaos.kills) if chaos else {}
        coco_report = coco_check(client, submitted.job_id, workdir / "export.coco.json") if coco else {"skipped": "not asked"}
    finally:
        if chaos is not None:
            chaos.stop()
        supervisor.stop()
        stop_all(pool)
        server.kill()
    kills = chaos.kills if chaos else []
    lost = checks["images"] - checks["exactly_once"] - checks["several"] - checks["torn"]
    return {
        "images": len(images), "workers": workers, "job_id": submitted.job_id, "submit_s": round(submitted.seconds, 2),
        "producer_killed": kill_producer, "registered_after_id_s": round(waited[0], 4) if waited else None,
        "wall_s": round(wall, 2), "submit_to_finish_s": round(time_to_finish, 2),
        "finished": bool(status and status.finished),
        "status_at_finish": first, "status_final": final.summary() if final is not None else None,
        "kills": {"total": len(kills), "main": sum(k["kind"] == "main" for k in kills),
                  "pool": sum(k["kind"] == "pool" for k in kills), "mid_task": sum(k["mid_task"] for k in kills)},
        "kill_log": kills, "killed_chunk_finished_after_s": delays,
        "redis_restarts": len(chaos.redis) if chaos else 0,
        "redis_log": chaos.redis if chaos else [], "chaos_errors": chaos.errors if chaos else [],
        "worker_restarts": supervisor.restarts,
        "exactly_once": checks["exactly_once"], "lost": lost, "several_results": checks["several"],
        "torn": checks["torn"], "not_done": checks["not_done"], "temporaries_left": checks["temporaries"],
        "segments": checks["segments"], "examples": checks["examples"], "manual_retries": 0,
        "status_polls_failed": poll.troubles, "status_ever_lost": poll.ever_lost,
        "reapers": log_counts(pool), "coco": coco_report, "side_jobs": side_reports,
        "loadavg": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in load_after]},
        "progress": _thin(poll.samples),
    }


def _thin(samples: list[tuple[float, dict]], every_s: float = 15.0) -> list[tuple[float, int]]:
    """(seconds, done) about every ``every_s`` seconds, for the record."""
    out, last = [], -every_s
    for t, summary in samples:
        if t - last >= every_s:
            out.append((t, summary["done"]))
            last = t
    if samples:
        out.append((samples[-1][0], samples[-1][1]["done"]))
    return out


def passed(result: dict) -> bool:
    """The issue's targets: every image exactly once, nothing lost or torn, no temporary left, no retry by
    hand, the side jobs finished, and (when a baseline was run) a wall time at most 1.5 x the undisturbed one."""
    ok = (result["exactly_once"] == result["images"] and result["lost"] == 0 and result["torn"] == 0
          and result["manual_retries"] == 0 and result["temporaries_left"] == 0
          and all(r.get("done") == r.get("total") for r in result.get("side_jobs", {}).values()))
    ratio = result.get("ratio")
    return ok and (ratio is None or ratio <= TARGET_RATIO)


def summary_line(result: dict) -> str:
    k = result["kills"]
    ratio = result.get("ratio")
    return (f"chaos: {result['exactly_once']}/{result['images']} images exactly once, {result['lost']} lost, "
            f"{result['torn']} torn, {result['temporaries_left']} temporaries left, {result['manual_retries']} manual "
            f"retries; {k['total']} kills ({k['main']} main, {k['pool']} pool, {k['mid_task']} mid-task), "
            f"{result['redis_restarts']} Redis restart(s); wall {result['wall_s']:.0f} s"
            + (f" vs {result['baseline_wall_s']:.0f} s undisturbed = {ratio:.2f}x" if ratio is not None else "")
            + "".join(f"; {kind} job {r.get('done')}/{r.get('total')} done" for kind, r in result.get("side_jobs", {}).items())
            + "".join(f"; {kind} kills' chunks done in {d['min_s']:.1f}/{d['median_s']:.1f}/{d['max_s']:.1f} s"
                      for kind, d in result.get("killed_chunk_finished_after_s", {}).items())
            + f"; {'PASS' if passed(result) else 'FAIL'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--kill-every", type=float, nargs=2, default=(10.0, 40.0), metavar=("MIN_S", "MAX_S"))
    parser.add_argument("--redis-down", type=float, nargs=2, default=(5.0, 30.0), metavar=("MIN_S", "MAX_S"))
    parser.add_argument("--no-redis", action="store_true", help="no Redis restart")
    parser.add_argument("--kinds", default="main,pool",
                        help="what the kills take, in turn: main (a whole worker) and/or pool (its pool process)")
    parser.add_argument("--baseline", action="store_true", help="also run the same job undisturbed (the ratio)")
    parser.add_argument("--baseline-wall", type=float, default=None, help="an undisturbed wall time measured before")
    parser.add_argument("--kill-producer", choices=("at-id", "registered", "fed"), default="at-id",
                        help="SIGKILL the producer the moment it prints the job id (the issue's scenario), once "
                             "Redis has the job, or once its first chunks are claimed")
    parser.add_argument("--side-jobs", action="store_true",
                        help="a training and an evaluation job in flight beside the segment job, under the same faults")
    parser.add_argument("--points-per-side", type=int, default=12,
                        help="SAM's point grid: more points, more work per image (a longer job holds more kills)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the run's files here (default: temporary)")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/chaos-<N>.json")
    args = parser.parse_args(argv)
    from jobs.settings import Settings

    out = args.out or ROOT / "bench" / "results" / f"chaos-{args.images}.json"
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="slip-chaos-"))
    say = lambda text: print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)  # noqa: E731
    images = make_images(workdir / "images", args.images, seed=args.seed)
    plan = Plan(kills=args.kills, kill_every=tuple(args.kill_every), kinds=tuple(args.kinds.split(",")),
                redis_down=None if args.no_redis else tuple(args.redis_down), seed=args.seed)
    # a SIGTERM (timeout, a CI runner) ends the run through its finally blocks: no worker or Redis left behind
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    say(f"chaos run: {args.images} images, {args.workers} workers, {args.kills} kills (workdir {workdir})")
    grid = ("--points-per-side", str(args.points_per_side))  # the last of a repeated option wins
    result = run(images, workdir=workdir / "chaos", workers=args.workers, plan=plan, timeout_s=args.timeout,
                 submit_args=grid, kill_producer=args.kill_producer, side_jobs=args.side_jobs, progress=say)
    baseline = args.baseline_wall
    if args.baseline:
        say("baseline run (undisturbed)")
        base = run(images, workdir=workdir / "baseline", workers=args.workers, plan=None, timeout_s=args.timeout,
                   submit_args=grid, coco=False, kill_producer=args.kill_producer, progress=say)
        baseline = base["wall_s"]
        result["baseline"] = {k: base[k] for k in ("wall_s", "exactly_once", "lost", "torn", "loadavg", "reapers")}
    if baseline:
        result["baseline_wall_s"] = baseline
        result["ratio"] = round(result["wall_s"] / baseline, 3)
    result["command"] = "python bench/chaos.py " + " ".join(sys.argv[1:] if argv is None else argv)
    defaults = Settings()
    result["settings"] = {"segment_args": [*SEGMENT_ARGS, *grid], "batch_size": 4, "max_in_flight": 32,
                          "SLIP_DEAD_AFTER": defaults.dead_after_s, "heartbeat_s": defaults.heartbeat_s,
                          "SLIP_LOST_AFTER": defaults.lost_after_s, "SLIP_MAX_ATTEMPTS": defaults.max_attempts,
                          "SLIP_VISIBILITY_TIMEOUT": defaults.visibility_timeout_s, "cores": os.cpu_count()}
    result["passed"] = passed(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(summary_line(result))
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
