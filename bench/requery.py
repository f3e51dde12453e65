"""Re-query benchmark: a new prompt on images already segmented, through the real queue, against the first
segment of the same images.

    python bench/requery.py [--images 50] [--repeats 3] [--batch-size 4] [--profile] [--barrier] [--out FILE]
    python bench/requery.py --mode ranker [--images 1000] [--repeats 3]       (issue 18: a fine-tuned ranker)

What runs for real: a private ``redis-server``, one ``celery -A worker worker -Q gpu,cpu --concurrency 1``
process with the bundled ``synth`` models on CPU, a directory store, ``QueueClient.submit_segment`` (what
``slip submit segment`` calls). Inputs: 1024x768 JPEGs of 12 synthetic objects (``bench.queue.make_scenes``).

Each round empties the store (inputs, proposals, results) and runs two jobs over the same images:

1. **first**: prompt A: upload, SAM, filters, crops, ranker image encoder, ranking, results;
2. **re-query**: prompt B: the proposals and crop embeddings are cached, so the worker reads them (not the
   image), encodes B once, multiplies, and writes ``segments.json``.

Every job has a prompt no earlier job used (the worker keeps encoded prompts), so each re-query pays for one
text encode, as a user's new prompt would. The warm-up (2 other images, a first and a re-query with two
other prompts) assembles the pipeline and runs every code path once before anything is timed.

Each job is timed from the call to ``submit_segment`` to its last completion record being published
(:func:`bench.queue.run_job`); per image, the cost of each, their ratio per round (target: the re-query at
least 50x cheaper), and the re-query split into model / store I/O / rendering / queue (:func:`bench.queue.split`).
The rounds interleave the two sides (first, re-query, first, re-query, ...); medians with min and max; the load
average around each job.

``--profile`` then profiles the re-query in the worker: a second worker, started through this file's
:func:`profiled_celery` (cProfile around each task in the pool process, one stats file per task, enabled by
the bench-only variable ``SLIP_BENCH_PROFILE``), runs a warm-up re-query and a measured one on the last round's
cache; the top functions of the measured job's tasks go into the JSON.

``--barrier`` measures, in this process, what one durability barrier per task instead of one per image would
save: ``worker.tasks.run_chunk`` on real resources (same store, Redis and models), once as it is and once with a
store whose ``put_many`` calls are held until the chunk's completion record is written and then published in
one ``put_many`` (a stand-in for a per-task barrier: nothing in production changes).

``--mode ranker`` (issue 18's re-answer) keeps the rounds but changes what the second job changes: the ranker.
Before the rounds, a ranker is fine-tuned from the bundled synth ranker the way ``slip review`` does it
(:func:`slip.train.finetune.fine_tune`, ``slip train-ranker --init synth``) on a few labelled crops (``slip data
synth``: 6 classes x 6 crops, a few optimiser steps: its weights differ, which is all the cost needs). Each
round: the first segment (prompt A, the synth ranker), then the same job re-answered with the fine-tuned ranker
(``QueueClient.submit_from_job(job, clip=DIR)``: ``slip submit segment --from-job JOB --clip DIR``; the ranker
uploaded to the store once, loaded by the worker on demand — during the warm-up, whose figures are kept). The
re-answer reads the cached proposals (no SAM work), decodes the image and its cached masks, crops and embeds
them with the new ranker and ranks: its cost per image over the first pass's (target: <= 5 %).

Writes ``bench/results/requery.json`` (``--mode ranker``: ``bench/results/requery-ranker.json``) and prints a
summary.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE, ROOT = Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]  # see bench/queue.py

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pstats  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

from bench.queue import (  # noqa: E402
    PARTS,
    bench_worker,
    clear_store,
    machine,
    make_scenes,
    run_job,
    run_submitted,
    segment_params,
    split,
    spread,
    worker_env,
)
from bench.servers import private_redis  # noqa: E402

# one new prompt per job (a job never finds its prompt encoded already: each re-query encodes its prompt once)
FIRST_PROMPTS = ("circle", "square", "house", "cat", "tree", "arrow")
REQUERY_PROMPTS = ("star", "heart", "triangle", "hexagon", "fish", "mushroom")
WARMUP_PROMPTS = ("a red shape", "a blue shape")
TARGET_RATIO = 50.0  # issue 11: the re-query at least 50x cheaper per image than the first segment
TARGET_RANKER_SHARE = 0.05  # issue 18: a re-answer with a new ranker costs at most 5 % of the first pass
PROFILE_ENV = "SLIP_BENCH_PROFILE"  # bench only: a folder; the worker started by profiled_celery profiles each task


# --- the profiled worker ------------------------------------------------------------------------------------


def profiled_celery() -> None:
    """``python -c 'from bench.requery import profiled_celery; profiled_celery()' -A worker worker ...``:
    the celery command, with cProfile running around every task in the process that executes it; each task's
    stats go to ``$SLIP_BENCH_PROFILE/<task id>.prof``."""
    import cProfile

    from celery import signals

    folder = Path(os.environ[PROFILE_ENV])
    folder.mkdir(parents=True, exist_ok=True)
    running: dict[str, cProfile.Profile] = {}

    @signals.task_prerun.connect(weak=False)
    def _start(task_id=None, **_):
        running[task_id] = cProfile.Profile()
        running[task_id].enable()

    @signals.task_postrun.connect(weak=False)
    def _stop(task_id=None, **_):
        profile = running.pop(task_id, None)
        if profile is not None:
            profile.disable()
            profile.dump_stats(folder / f"{task_id}.prof")

    from celery.__main__ import main as celery_main

    sys.argv = ["celery", *sys.argv[1:]]
    celery_main()


def profile_requery(env: dict, store: Path, paths, params, *, batch_size: int, work: Path, top: int = 40) -> dict:
    """A warm-up re-query and a measured one in a profiled worker; the measured job's profile, summed over its
    tasks: wall figures and the ``top`` functions by cumulative and by own time."""
    from jobs.status import chunk_records
    from jobs.settings import Settings
    from producer.client import QueueClient

    folder = work / "profiles"
    launcher = [sys.executable, "-c", "from bench.requery import profiled_celery; profiled_celery()"]
    with bench_worker({**env, PROFILE_ENV: str(folder)}, work / "worker-profiled.log", name="profiled",
                      launcher=launcher):
        client = QueueClient(Settings.from_env(env))
        run_job(client, paths, ["a green shape"], params, batch_size=batch_size, store_root=store)  # warm-up
        run = run_job(client, paths, ["a yellow shape"], params, batch_size=batch_size, store_root=store)
    tasks = [r.task_id for r in chunk_records(client.store, run["job_id"])]
    files = [str(folder / f"{t}.prof") for t in tasks]
    report = {"job": {k: run[k] for k in ("wall_s", "images", "batch_size", "how")}, **split(run),
              "tasks": len(tasks), "profiled_s": pstats.Stats(*files).total_tt}
    for order in ("cumulative", "tottime"):
        text = io.StringIO()
        pstats.Stats(*files, stream=text).sort_stats(order).print_stats(top)
        report[f"top_by_{order}"] = [line.rstrip() for line in text.getvalue().splitlines() if line.strip()][-top - 1:]
    return report


# --- the per-task barrier, measured in-process -------------------------------------------------------------------


class HeldWrites:
    """A store whose ``put_many`` calls are held and published in one ``put_many`` right before the next
    ``put_bytes`` (the chunk's completion record): one durability barrier per chunk instead of one per image.
    Everything else goes to ``store``. A bench stand-in, not production code: with rendered PNGs on an object
    store one call would no longer publish each image's ``segments.json`` after its PNGs."""

    def __init__(self, store) -> None:
        self.store = store
        self.held: dict[str, bytes] = {}

    def put_many(self, files):
        self.held.update(files)
        return list(files)

    def put_bytes(self, key, data):
        self.flush()
        return self.store.put_bytes(key, data)

    def put_json(self, key, value):
        self.flush()
        return self.store.put_json(key, value)

    def flush(self) -> None:
        if self.held:
            self.store.put_many(self.held)
            self.held = {}

    def __getattr__(self, name):
        return getattr(self.store, name)


def measure_barrier(env: dict, paths, params, *, batch_size: int, repeats: int) -> dict:
    """Seconds per image of ``run_chunk`` over every chunk of a re-query job, per-image barrier (as it is) vs one
    barrier per chunk (:class:`HeldWrites`), interleaved, each time with a new prompt (encoded once per job)."""
    from dataclasses import replace

    from jobs.settings import Settings
    from producer.client import QueueClient
    from worker.resources import load_resources
    from worker.tasks import run_chunk

    settings = Settings.from_env(env)
    client = QueueClient(settings)
    res = load_resources(settings, load_models=True, send=client.send, instance="inproc")
    results: dict[str, list[float]] = {"per_image": [], "per_chunk": []}
    prompts = [f"shape number {i}" for i in range(2 * (repeats + 1))]
    res.engine(params).encode_prompts(prompts)  # the text encodes are not what is measured here
    try:
        for repeat in range(repeats + 1):  # the first round warms up and is not kept
            for variant in results:
                prompt = prompts[2 * repeat + (variant == "per_chunk")]
                manifest = client.create_job([str(p) for p in paths], [prompt], params, batch_size=batch_size)
                client.start(manifest, window=manifest.chunks)  # every chunk sent now (no worker takes them)
                chunk_res = res if variant == "per_image" else replace(res, store=HeldWrites(res.store))
                start = time.perf_counter()
                for chunk in range(manifest.chunks):
                    done = run_chunk(chunk_res, manifest.job_id, chunk, 0, task_id=str(uuid.uuid4()), node="inproc")
                    if done.get("failed") != 0:
                        raise RuntimeError(f"in-process chunk failed: {done}")
                if repeat:
                    results[variant].append((time.perf_counter() - start) / manifest.total)
    finally:
        res.close()
    ms = {k: spread([v * 1e3 for v in vs]) for k, vs in results.items()}
    return {"ms_per_image": ms, "saved_ms_per_image": ms["per_image"]["median"] - ms["per_chunk"]["median"],
            "batch_size": batch_size, "images": len(paths), "repeats": repeats,
            "what": "worker.tasks.run_chunk in-process over a re-query job; per_chunk holds put_many until the "
                    "completion record (bench stand-in for one durability barrier per task)"}


def finetuned_ranker(work: Path) -> tuple[Path, dict]:
    """A ranker fine-tuned from the bundled synth ranker as ``slip review`` / ``slip train-ranker --init synth``
    does, on a few labelled crops; its directory and what was done."""
    from dataclasses import replace

    from slip.data.synth import generate_dataset
    from slip.train.finetune import REVIEW_RECIPE, fine_tune

    start = time.perf_counter()
    labels = generate_dataset(work / "labels", classes=6, per_class=6, size=64, seed=11)
    result = fine_tune(labels, work / "ranker", init="synth", config=replace(REVIEW_RECIPE, device="cpu", epochs=1),
                       min_steps=6)
    return Path(result.out), {"init": "synth", "labels": "slip data synth: 6 classes x 6 crops, 64 px",
                              "recipe": "slip.train.finetune.REVIEW_RECIPE, 1 epoch, >= 6 steps",
                              "seconds": round(time.perf_counter() - start, 1)}


def ranker_rounds(client, paths, warm, params, *, ranker: Path, batch_size: int, repeats: int, store: Path) -> tuple:
    """Warm-up, then ``repeats`` rounds of (first segment with the worker's ranker, re-answer with ``ranker``)."""
    def reanswer(job: str, count: int) -> dict:
        return run_submitted(client, lambda: client.submit_from_job(job, clip=str(ranker)), images=count,
                             store_root=store)

    warm_first = run_job(client, warm, [WARMUP_PROMPTS[0]], params, batch_size=batch_size, store_root=store)
    warm_again = reanswer(warm_first["job_id"], len(warm))  # uploads the ranker; the worker loads it
    rounds = []
    for repeat in range(repeats):
        clear_store(store)
        prompt = FIRST_PROMPTS[repeat % len(FIRST_PROMPTS)]  # new to both rankers' text caches
        first = run_job(client, paths, [prompt], params, batch_size=batch_size, store_root=store)
        again = reanswer(first["job_id"], len(paths))
        if again["how"] != ["cached"]:
            raise RuntimeError(f"the re-answer did not use the cached proposals: {again['how']}")
        first.update(split(first))
        again.update(split(again))
        share = again["ms_per_image"]["total"] / first["ms_per_image"]["total"]
        rounds.append({"round": repeat, "prompt": prompt, "first": first, "reanswer": again, "share": share})
        print(f"round {repeat}: first {first['ms_per_image']['total']:.1f} ms/image, re-answer with the fine-tuned "
              f"ranker {again['ms_per_image']['total']:.1f} ms/image ({share:.1%} of the first)", flush=True)
    warmup = {"first": {k: warm_first[k] for k in ("wall_s", "images", "how")},
              "reanswer_with_ranker_load": {k: warm_again[k] for k in ("wall_s", "images", "how")}}
    return rounds, warmup


def stage_ms(runs: list[dict]) -> dict:
    """Median milliseconds per image of each worker stage over ``runs``."""
    names = sorted({s for r in runs for s in r["stages_s"]})
    return {n: statistics.median(r["stages_s"].get(n, 0.0) / r["images"] * 1e3 for r in runs) for n in names}


# --- the benchmark -----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=50, help="images per job (1024x768 JPEG)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (first, re-query)")
    parser.add_argument("--batch-size", type=int, default=4, help="K, images per task (the CLI's default is 4)")
    parser.add_argument("--render", action="store_true", help="jobs write mask and overlay PNGs too")
    parser.add_argument("--filters", default=None,
                        help="filter chain of the jobs (default: the synth SAM's filters.json chain)")
    parser.add_argument("--profile", action="store_true", help="profile a re-query inside a worker (cProfile)")
    parser.add_argument("--barrier", action="store_true", help="measure a per-task durability barrier in-process")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--threads", type=int, default=None,
                        help="the worker's torch threads (SLIP_THREADS; default: cores / concurrency)")
    parser.add_argument("--mode", choices=("prompt", "ranker"), default="prompt",
                        help="what the second job changes: a new prompt (issue 11), or the ranker (issue 18)")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/requery[-ranker].json")
    args = parser.parse_args(argv)
    args.out = args.out or ROOT / "bench" / "results" / ("requery.json" if args.mode == "prompt" else
                                                          "requery-ranker.json")
    if shutil.which("redis-server") is None:
        parser.error("redis-server is not installed (apt-get install redis-server)")

    from producer.client import QueueClient
    from jobs.settings import Settings

    params = segment_params(args.render, args.filters)
    before = machine()
    extra: dict = {}
    with tempfile.TemporaryDirectory(prefix="slip-bench-requery-", dir=args.workdir) as tmp:
        work = Path(tmp)
        paths = make_scenes(work / "images", args.images, seed=3)
        warm = make_scenes(work / "warm", 2, seed=4)
        store = work / "store"
        with private_redis() as url:
            env = worker_env(url, store, **({"SLIP_THREADS": str(args.threads)} if args.threads else {}))
            rounds = []
            if args.mode == "ranker":
                ranker, made = finetuned_ranker(work)
                with bench_worker(env, work / "worker.log") as worker:
                    client = QueueClient(Settings.from_env(env))
                    rounds, warmup = ranker_rounds(client, paths, warm, params, ranker=ranker,
                                                   batch_size=args.batch_size, repeats=args.repeats, store=store)
                result = ranker_result(args, rounds, warmup, made, before, worker, params)
                return write_result(args.out, result, ranker_report(result))
            with bench_worker(env, work / "worker.log") as worker:
                client = QueueClient(Settings.from_env(env))
                for prompt in WARMUP_PROMPTS:  # warm-up: the pipeline and both code paths, on other images
                    warmup = run_job(client, warm, [prompt], params, batch_size=args.batch_size, store_root=store)
                for repeat in range(args.repeats):
                    clear_store(store)
                    prompt_a, prompt_b = (FIRST_PROMPTS[repeat % len(FIRST_PROMPTS)],
                                          REQUERY_PROMPTS[repeat % len(REQUERY_PROMPTS)])
                    first = run_job(client, paths, [prompt_a], params, batch_size=args.batch_size, store_root=store)
                    again = run_job(client, paths, [prompt_b], params, batch_size=args.batch_size, store_root=store)
                    if again["how"] != ["cached"]:
                        raise RuntimeError(f"the re-query did not use the cached proposals: {again['how']}")
                    first.update(split(first))
                    again.update(split(again))
                    ratio = first["ms_per_image"]["total"] / again["ms_per_image"]["total"]
                    rounds.append({"round": repeat, "prompts": [prompt_a, prompt_b], "first": first, "requery": again,
                                   "ratio": ratio})
                    print(f"round {repeat}: first {first['ms_per_image']['total']:.1f} ms/image, re-query "
                          f"{again['ms_per_image']['total']:.2f} ms/image, x{ratio:.0f}", flush=True)
            if args.profile:
                extra["profile"] = profile_requery(env, store, paths, params, batch_size=args.batch_size, work=work)
            if args.barrier:
                extra["barrier"] = measure_barrier(env, paths, params, batch_size=args.batch_size, repeats=args.repeats)
    summary = {
        "first_ms_per_image": spread([r["first"]["ms_per_image"]["total"] for r in rounds]),
        "requery_ms_per_image": spread([r["requery"]["ms_per_image"]["total"] for r in rounds]),
        "ratio": spread([r["ratio"] for r in rounds]),
        "requery_split_ms_per_image": {part: spread([r["requery"]["ms_per_image"][part] for r in rounds])
                                       for part in PARTS},
        "first_split_ms_per_image": {part: spread([r["first"]["ms_per_image"][part] for r in rounds]) for part in PARTS},
    }
    result = {
        "what": "first segment vs re-query (cached proposals + embeddings) per image, through a real worker; "
                "see bench/requery.py",
        "machine": {**before, "loadavg_after": os.getloadavg()},
        "settings": {"images": args.images, "image": "1024x768 JPEG, 3x4 synthetic objects",
                     "models": "synth (SAM) + synth (ranker), CPU", "prompts": "a new one per job (see rounds)",
                     "batch_size": args.batch_size, "params": params.model_dump(mode="json"), "repeats": args.repeats,
                     "worker": "celery -A worker worker -Q gpu,cpu --concurrency 1",
                     "worker_threads": worker["health"].get("threads")},
        "warmup": {k: warmup[k] for k in ("wall_s", "images", "how")},
        "rounds": rounds,
        "summary": summary,
        "target": {"ratio": TARGET_RATIO, "met": summary["ratio"]["median"] >= TARGET_RATIO},
        **extra,
    }
    return write_result(args.out, result, report(result))


def write_result(out: Path, result: dict, text: str) -> int:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(text)
    print(f"\nwritten: {out}")
    return 0


def ranker_result(args, rounds: list[dict], warmup: dict, made: dict, before: dict, worker: dict, params) -> dict:
    summary = {
        "first_ms_per_image": spread([r["first"]["ms_per_image"]["total"] for r in rounds]),
        "reanswer_ms_per_image": spread([r["reanswer"]["ms_per_image"]["total"] for r in rounds]),
        "share": spread([r["share"] for r in rounds]),
        "reanswer_split_ms_per_image": {part: spread([r["reanswer"]["ms_per_image"][part] for r in rounds])
                                        for part in PARTS},
        "reanswer_stages_ms_per_image": stage_ms([r["reanswer"] for r in rounds]),
        "first_stages_ms_per_image": stage_ms([r["first"] for r in rounds]),
    }
    return {
        "what": "first segment vs re-answering the same job with a fine-tuned ranker (slip submit segment --from-job "
                "JOB --clip DIR: cached proposals, new crop embeddings) per image, through a real worker; see "
                "bench/requery.py --mode ranker",
        "command": "python bench/requery.py " + " ".join(sys.argv[1:]),
        "machine": {**before, "loadavg_after": os.getloadavg()},
        "settings": {"images": args.images, "image": "1024x768 JPEG, 3x4 synthetic objects",
                     "models": "synth (SAM) + synth (ranker), re-answered with a fine-tuned synth ranker, CPU",
                     "ranker": made, "batch_size": args.batch_size, "params": params.model_dump(mode="json"),
                     "repeats": args.repeats, "worker": "celery -A worker worker -Q gpu,cpu --concurrency 1",
                     "worker_threads": worker["health"].get("threads")},
        "warmup": warmup,
        "rounds": rounds,
        "summary": summary,
        "target": {"share": TARGET_RANKER_SHARE, "met": summary["share"]["median"] <= TARGET_RANKER_SHARE},
    }


def ranker_report(result: dict) -> str:
    s = result["summary"]
    fmt = lambda d, p=1: f"{d['median']:.{p}f} [{d['min']:.{p}f}, {d['max']:.{p}f}]"  # noqa: E731
    share = s["share"]
    stages = ", ".join(f"{k} {v:.1f}" for k, v in sorted(s["reanswer_stages_ms_per_image"].items(),
                                                          key=lambda kv: -kv[1])[:6])
    m = result["machine"]
    return "\n".join([
        f"{result['settings']['images']} images, K={result['settings']['batch_size']}, "
        f"{result['settings']['repeats']} rounds; ms per image, median [min, max]",
        f"first segment            {fmt(s['first_ms_per_image'])}",
        f"re-answer, new ranker    {fmt(s['reanswer_ms_per_image'])}",
        f"share of the first pass  {share['median']:.1%} [{share['min']:.1%}, {share['max']:.1%}] (target <= "
        f"{TARGET_RANKER_SHARE:.0%}: {'met' if result['target']['met'] else 'NOT met'})",
        f"re-answer stages (ms/image): {stages}",
        f"load average (1 min): {m['loadavg'][0]:.1f} before, {m['loadavg_after'][0]:.1f} after",
    ])


def report(result: dict) -> str:
    s = result["summary"]
    fmt = lambda d, p=1: f"{d['median']:.{p}f} [{d['min']:.{p}f}, {d['max']:.{p}f}]"  # noqa: E731
    lines = [
        f"{result['settings']['images']} images, K={result['settings']['batch_size']}, {result['settings']['repeats']} "
        f"rounds; ms per image, median [min, max]",
        f"first segment  {fmt(s['first_ms_per_image'])}",
        f"re-query       {fmt(s['requery_ms_per_image'], 2)}",
        f"ratio          x{fmt(s['ratio'], 0)} (target >= x{TARGET_RATIO:.0f}: "
        f"{'met' if result['target']['met'] else 'NOT met'})",
        "re-query split " + ", ".join(f"{p} {fmt(v, 2)}" for p, v in s["requery_split_ms_per_image"].items()),
    ]
    if "barrier" in result:
        b = result["barrier"]["ms_per_image"]
        lines.append(f"in-process run_chunk, re-query: barrier per image {fmt(b['per_image'], 2)}, per chunk "
                     f"{fmt(b['per_chunk'], 2)} ms/image")
    m = result["machine"]
    lines.append(f"load average (1 min): {m['loadavg'][0]:.1f} before, {m['loadavg_after'][0]:.1f} after")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
