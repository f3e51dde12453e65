"""Workers load their models through the one builder: a SAM 2 worker (``SLIP_SAM=tiny-random-sam2``) and a
``sam3-rank`` worker (``SLIP_ENGINE=sam3-rank``, ``tiny-random-sam3`` proposing one concept, the ranker picking),
each a real ``celery -A worker worker`` on its own private redis-server (and workers whose SAM is
``tiny-random-edgetam`` or ``tiny-random-sam3-tracker``). Each serves the jobs that name it (a new
prompt from its cached proposals), says what it serves in its heartbeat, and fails for now a job for another SAM
or engine, naming the worker to start."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from typing import Iterator

import pytest

from queue_helpers import (TINY_PARAMS, bench_module, client_for, make_images, outcomes, queue_env, start_worker,
                           stop_worker, wait_worker_ready)

pytestmark = pytest.mark.integration
SAM_STAGES = {"sam", "encode", "decode", "filters"}


@contextmanager
def cluster(tmp_path_factory, name: str, **env_changes: str) -> Iterator[dict]:
    """A private redis-server and one real worker with ``env_changes``: ``{"env", "client", "log", "health"}``."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: run `bash scripts/setup.sh`")
    with bench_module("servers").private_redis() as url:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        env = queue_env(tmp_path_factory.mktemp(f"{name}-store"), db=0, port=port,
                        SLIP_CACHE=str(tmp_path_factory.mktemp(f"{name}-cache")), **env_changes)
        log = tmp_path_factory.mktemp(f"{name}-logs") / f"{name}.log"
        process = start_worker(env, ("gpu", "cpu"), name, log_path=log)
        try:
            health = wait_worker_ready(env, name, process=process)
        except RuntimeError as e:
            stop_worker(process, timeout_s=5)
            pytest.fail(f"{e}\n--- worker log ---\n{log.read_text(errors='replace')[-4000:]}")
        client = client_for(env)
        try:
            yield {"env": env, "client": client, "log": log, "health": health}
        finally:
            client.board.r.close()
            stop_worker(process)


@pytest.fixture(scope="module")
def sam2(tmp_path_factory) -> Iterator[dict]:
    with cluster(tmp_path_factory, "sam2", SLIP_SAM="tiny-random-sam2") as c:
        yield c


@pytest.fixture(scope="module")
def sam3_rank(tmp_path_factory) -> Iterator[dict]:
    with cluster(tmp_path_factory, "sam3rank", SLIP_ENGINE="sam3-rank", SLIP_SAM="tiny-random-sam3") as c:
        yield c


def finish(c: dict, job: str, expect: str = "done") -> dict[int, tuple]:
    """Wait for ``job``; each image's (outcome, segments.json or None), all in state ``expect``."""
    status = c["client"].wait(job, timeout_s=120, poll_s=0.2)
    found = outcomes(c["client"].store, job)
    assert status.finished and {o.state for o in found.values()} == {expect}, (
        [o.reason for o in found.values()], c["log"].read_text(errors="replace")[-3000:])
    store = c["client"].store
    return {i: (o, store.get_json(f"{o.result_key}/segments.json") if o.state == "done" else None)
            for i, o in sorted(found.items())}


def test_a_sam2_worker_serves_sam2_jobs_and_a_new_prompt_from_their_proposals(sam2, tmp_path):
    client = sam2["client"]
    assert sam2["health"]["engine"] == "slip" and sam2["health"]["sam"]["arch"] == "tiny-random-sam2"
    (row,) = client.workers()
    assert row.serves == {"engine": "slip", "sam": "tiny-random-sam2", "clip": "tiny-random"}
    paths = make_images(tmp_path, 3, seed=71)
    job = client.submit_segment(paths, ["a red box"], TINY_PARAMS, batch_size=3)
    first = finish(sam2, job)
    for outcome, doc in first.values():
        assert outcome.how == "computed" and doc["request"]["sam"]["arch"] == "tiny-random-sam2"
        assert "engine" not in doc["request"] or doc["request"]["engine"] == "slip"
        assert len(doc["segments"]) > 0, "the tiny SAM 2 must propose segments, or this checks nothing"
    again = finish(sam2, client.submit_from_job(job, prompts=["a blue disc"]))
    for index, (outcome, doc) in again.items():
        assert outcome.how == "cached" and not SAM_STAGES & set(doc["timings_s"])
        assert [s["segmentation"] for s in doc["segments"]] == [s["segmentation"] for s in first[index][1]["segments"]]


def test_a_job_for_another_sam_fails_for_now_naming_the_worker_to_start(sam2, tmp_path):
    client = sam2["client"]
    job = client.submit_segment(make_images(tmp_path, 1, seed=72), ["a red box"], TINY_PARAMS, sam="tiny-random")
    ((outcome, _),) = finish(sam2, job, expect="failed").values()
    assert outcome.error == "ModelMismatchError" and not outcome.permanent
    assert outcome.reason.endswith("serves sam=tiny-random-sam2, but the job asks for sam=tiny-random: start a "
                                   "worker with SLIP_SAM=tiny-random")


def test_a_sam3_rank_worker_proposes_with_sam3_and_ranks_with_the_ranker(sam3_rank, tmp_path):
    client = sam3_rank["client"]
    (row,) = client.workers()
    assert row.serves == {"engine": "sam3-rank", "sam": "tiny-random-sam3", "clip": "tiny-random"}
    paths = make_images(tmp_path, 2, seed=73)
    job = client.submit_segment(paths, ["a red box"], {"propose": "shape", "filters": "none"},
                                engine="sam3-rank", sam="tiny-random-sam3", batch_size=2)
    first = finish(sam3_rank, job)
    for outcome, doc in first.values():
        assert outcome.how == "computed" and doc["request"]["engine"] == "sam3-rank"
        assert doc["request"]["propose"] == "shape" and doc["request"]["ranker"]["arch"] == "tiny-random"
        assert len(doc["segments"]) > 0 and doc["matches"][0]["best"] is not None  # SAM 3 proposed, the ranker chose
    again = finish(sam3_rank, client.submit_from_job(job, prompts=["a blue disc"]))
    for outcome, doc in again.values():
        assert outcome.how == "cached" and not SAM_STAGES & set(doc["timings_s"])
    other = finish(sam3_rank, client.submit_from_job(job, options={"propose": "animal"}))
    assert {o.how for o, _ in other.values()} == {"computed"}, "another concept is another set of proposals"
    # a slip-engine job on this worker: failed for now, naming the worker to start
    wrong = client.submit_segment(paths[:1], ["a red box"], TINY_PARAMS, engine="slip", sam="tiny-random")
    ((outcome, _),) = finish(sam3_rank, wrong, expect="failed").values()
    assert "serves sam=tiny-random-sam3 (engine sam3-rank), but the job asks for sam=tiny-random" in outcome.reason
    assert "start a worker with SLIP_ENGINE=slip SLIP_SAM=tiny-random" in outcome.reason


@pytest.mark.parametrize("sam", ["tiny-random-edgetam", "tiny-random-sam3-tracker"])
def test_a_worker_serves_jobs_with_a_transformers_tracker_as_its_proposer(tmp_path_factory, tmp_path, sam):
    """EdgeTAM and the SAM 3 tracker as a worker's SAM: it loads them, says so, and a job gets their proposals."""
    name = sam.removeprefix("tiny-random-").replace("-", "")
    with cluster(tmp_path_factory, name, SLIP_SAM=sam) as c:
        assert c["health"]["engine"] == "slip" and c["health"]["sam"]["arch"] == sam
        job = c["client"].submit_segment(make_images(tmp_path, 2, seed=73), ["a red box"], TINY_PARAMS, batch_size=2)
        for outcome, doc in finish(c, job).values():
            assert outcome.how == "computed" and doc["request"]["sam"]["arch"] == sam
            assert len(doc["request"]["sam"]["sha256"]) == 64
            assert len(doc["segments"]) > 0, "the tracker must propose segments, or this checks nothing"
