"""Training and evaluation through the real queue: Redis db 12, one real Celery worker process.

The evaluation job's aggregate must equal the same evaluation run locally (same seeded composites, the
same seeded tiny-random CLIP): chunks fanned out, results written by the worker, summed by the producer.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "queue"))
from queue_helpers import (  # noqa: E402
    invoke_cli,
    job_id_from,
    module_worker,
)

from slip.data.synth import generate_dataset  # noqa: E402
from slip.evaluate import evaluate_rankers  # noqa: E402
from slip.rankers.dual_encoder import DualEncoderRanker  # noqa: E402
from slip.rankers.loading import load_ranker  # noqa: E402
import redis_dbs  # noqa: E402

DB = redis_dbs.TRAINING
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def train_worker(tmp_path_factory):
    with module_worker(tmp_path_factory, db=DB, name="trainer") as worker:
        yield worker


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("qsynth") / "ds", classes=6, per_class=10, size=40, seed=0)


def _run(args, env):
    done = invoke_cli(args, env)
    assert done.exit_code == 0, done.output
    return done.stdout


def test_evaluation_through_a_worker_aggregates_like_a_local_run(train_worker, dataset):
    env, store = train_worker["env"], train_worker["store"]
    out = _run(["submit", "evaluate", str(dataset), "--ranker", "tiny-random", "--composites", "7", "--chunk", "3",
                "--tile-size", "32", "--gallery", "4", "--wait"], env)
    job = job_id_from(out)
    assert "tiny-random" in out and "7/7" in out
    chunks = sorted((store / "jobs" / job / "eval" / "0").glob("*.json"))
    assert [p.name for p in chunks] == ["0.json", "1.json", "2.json"]  # 3 + 3 + 1 composites
    stored = [json.loads(p.read_text()) for p in chunks]
    assert [len(c["results"]) for c in stored] == [24, 24, 8]  # 4 queries x 2 modes per composite
    assert [len(c["gallery"]) for c in stored] == [3, 1, 0]
    queued = json.loads((store / "jobs" / job / "evaluation.json").read_text())[0]["summary"]
    local = evaluate_rankers(dataset, ["tiny-random"], composites=7, tile_size=32, device="cpu")[0].summary
    assert queued == local
    assert queued["plain"]["queries"] == 28 and sum(v["queries"] for v in queued["plain"]["per_class"].values()) == 28


def test_grid_search_through_a_worker_then_evaluate_and_report(train_worker, dataset, tmp_path):
    env = train_worker["env"]
    best = tmp_path / "best"
    out = _run(["submit", "train", str(dataset), "--grid", "lr=1e-3,1e-2", "--grid", "proj_dim=8,16",
                "--image-backbone", "test_resnet", "--random-image", "--text-encoder", "tiny-random", "--random-text",
                "--image-size", "32",
                "--epochs", "1", "--batch-size", "8", "--wait", "--out", str(best)], env)
    train_job = job_id_from(out)
    table = [line for line in out.splitlines()[1:] if line.strip() and line.strip()[0].isdigit()]
    assert len(table) == 4 and sum("<- best" in line for line in table) == 1
    ranker = load_ranker(str(best), device="cpu")
    assert isinstance(ranker, DualEncoderRanker) and ranker.image_size == 32
    out = _run(["submit", "evaluate", str(dataset), "--ranker", f"job:{train_job}", "--ranker", str(best),
                "--composites", "4", "--chunk", "2", "--tile-size", "32", "--wait"], env)
    eval_job = job_id_from(out)
    rows = json.loads((train_worker["store"] / "jobs" / eval_job / "evaluation.json").read_text())
    assert rows[0]["summary"] == rows[1]["summary"]  # the best cell, addressed two ways
    page = tmp_path / "report.html"
    _run(["report", train_job, eval_job, "--out", str(page)], env)
    html = page.read_text()
    assert html.count("<tr class=\"best\">") == 1 and "Training curves" in html and "Gallery" in html


def test_training_requests_must_say_where_the_towers_start(train_worker, dataset):
    """No silent random weights on a worker either: a request without the flags is refused, and a
    pretrained backbone the worker does not have fails with the fetch command (failed for good: nothing is
    run again). The requests bypass the CLI's own checks: a job written by another client."""
    from jobs.status import chunk_records
    from jobs.training import upload_directory
    from queue_helpers import client_for

    client = client_for(train_worker["env"])
    model = {"image_backbone": "test_resnet", "text_encoder": "tiny-random", "text_pooling": "mean", "image_size": 32,
             "proj_dim": 8}
    job = "20240101-000000-flags0"
    base = {"job_id": job, "dataset": upload_directory(client.store, dataset), "train": {"epochs": 1, "batch_size": 8}}
    requests = [{**base, "cell": 0, "model": model},
                {**base, "cell": 1, "model": {**model, "pretrained_image": True, "pretrained_text": False}}]
    client.submit("train", {"cells": [{}, {}]}, requests, job_id=job, names=["no flags", "missing backbone"])
    status = client.wait(job, timeout_s=120, poll_s=0.5)
    assert status.counts["failed"] == 2 and status.retryable == 0, status.summary()
    outcomes = {o.index: (r.attempt, o) for r in chunk_records(client.store, job) for o in r.items}
    expected = {0: ("ConfigError", "must set model.pretrained_image and model.pretrained_text"),
                1: ("WeightsNotFoundError", "slip weights fetch timm/test_resnet.r160_in1k")}
    for index, (kind, text) in expected.items():
        attempt, outcome = outcomes[index]
        assert attempt == 0 and outcome.permanent and outcome.error == kind, outcome
        assert text in outcome.reason and "\n" not in outcome.reason, outcome.reason
    assert not list((train_worker["store"] / "jobs").glob(f"{job}/cells/*/result.json"))
    done = invoke_cli(["status", job, "--json"], train_worker["env"])  # reported like any job
    shown = json.loads(done.stdout)
    assert (shown["kind"], shown["total"], shown["failed"]) == ("train", 2, 2)
    assert sorted(g["error"] for g in shown["failures"]) == ["ConfigError", "WeightsNotFoundError"]
