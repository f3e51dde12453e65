"""The ``sam3`` engine through the queue: a real worker (``SLIP_ENGINE=sam3``, ``tiny-random-sam3``) serves jobs
that name it, keeps SAM 3's vision features (in process; in the store with ``--keep-features``) and answers a new
prompt on the same images from them (``--from-job``: no image read, no backbone); a job for another engine fails
for now naming the worker to start; a bad engine request is one line before anything is uploaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator

import pytest

from queue_helpers import (bench_module, invoke_cli, job_id_from, make_images, outcomes, queue_env, start_worker,
                           stop_worker, wait_worker_ready)

pytestmark = pytest.mark.integration
SAM3 = "tiny-random-sam3"
ENGINE = ["--engine", "sam3", "--sam", SAM3]
BACKBONE = {"encode", "read_input", "decode_image"}  # what a new prompt on known images must not do


@pytest.fixture(scope="module")
def sam3(tmp_path_factory) -> Iterator[dict]:
    """A private redis-server and one real worker serving engine sam3 with tiny-random-sam3."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: run `bash scripts/setup.sh`")
    with bench_module("servers").private_redis() as url:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        store = tmp_path_factory.mktemp("sam3-store")
        env = queue_env(store, db=0, port=port, SLIP_ENGINE="sam3", SLIP_SAM=SAM3,
                        SLIP_CACHE=str(tmp_path_factory.mktemp("sam3-cache")))
        log = tmp_path_factory.mktemp("sam3-logs") / "sam3.log"
        process = start_worker(env, ("gpu", "cpu"), "sam3", log_path=log)
        try:
            health = wait_worker_ready(env, "sam3", process=process)
        except RuntimeError as e:
            stop_worker(process, timeout_s=5)
            pytest.fail(f"{e}\n--- worker log ---\n{log.read_text(errors='replace')[-4000:]}")
        try:
            yield {"env": env, "store": store, "log": log, "health": health}
        finally:
            stop_worker(process)


def submit(sam3: dict, args: list[str]) -> str:
    proc = invoke_cli(["submit", "segment", *args, "--wait", "--timeout", "120"], sam3["env"])
    assert proc.exit_code == 0, proc.stdout + proc.stderr + sam3["log"].read_text(errors="replace")[-3000:]
    return job_id_from(proc.stdout)


def store_of(root: Path):
    from jobs.store import Store

    return Store(str(root))


def docs(root: Path, job: str) -> dict[int, dict]:
    """Each image's ``segments.json`` (by index) of a finished job."""
    found = outcomes(store_of(root), job)
    return {i: json.loads((root / o.result_key / "segments.json").read_text()) for i, o in sorted(found.items())}


def test_the_worker_serves_sam3_and_keeps_features_for_a_new_prompt(sam3, tmp_path):
    store = sam3["store"]
    health = sam3["health"]
    assert health["engine"] == "sam3" and health["sam"]["arch"] == SAM3 and health["clip"] is None
    paths = [str(p) for p in make_images(tmp_path, 3, seed=61)]
    first = submit(sam3, [*paths, "-p", "a red box", *ENGINE, "--keep-features", "--batch-size", "3"])
    done = outcomes(store_of(store), first)
    assert {o.how for o in done.values()} == {"computed"}
    first_docs = docs(store, first)
    for doc in first_docs.values():
        assert doc["request"]["engine"] == "sam3" and doc["request"]["sam"]["arch"] == SAM3
        assert doc["runtime"]["features"] == "computed" and "encode" in doc["timings_s"]
    features = sorted(store.glob("proposals/*/*/vision.safetensors"))
    assert len(features) == 3 and all(f.stat().st_size > 1_000_000 for f in features)  # ~7 MB fp16 each

    # a new prompt on the same images: the job's images, prompts and engine from --from-job
    second = submit(sam3, ["--from-job", first, "-p", "a blue disc"])
    for index, doc in docs(store, second).items():
        assert doc["prompts"] == ["a blue disc"] and doc["request"]["engine"] == "sam3"
        assert doc["runtime"]["proposals"] == "cached" and doc["runtime"]["features"] == "process"
        assert not BACKBONE & set(doc["timings_s"]), doc["timings_s"]
        assert {"clip_text", "decode"} <= set(doc["timings_s"])
        assert doc["request_digest"] != first_docs[index]["request_digest"]
    assert sorted(store.glob("proposals/*/*/vision.safetensors")) == features  # nothing stored twice


def test_features_read_from_the_store_answer_as_freshly_computed_ones(sam3, tmp_path):
    """Another process (a new worker, in-process here) reads the stored features, never the image; its answer
    equals one computed from the image after the stored features are gone (every answer comes from the packed
    features)."""
    from dataclasses import replace

    from jobs.settings import Settings
    from producer.client import QueueClient
    from worker.models import WarmModels
    from worker.resources import load_resources
    from worker.tasks import run_chunk

    store = sam3["store"]
    paths = [str(p) for p in make_images(tmp_path, 2, seed=62)]
    first = submit(sam3, [*paths, "-p", "a red box", *ENGINE, "--keep-features", "--batch-size", "2"])
    settings = Settings.from_env(sam3["env"])
    loaded = load_resources(settings, load_models=True, send=lambda *a, **k: None, instance="in-process")

    def answer(prompt: str) -> dict:
        """The prompt on the first job's images, in a process that has seen none of them (empty caches)."""
        res = replace(loaded, models=WarmModels(loaded.models.loaded, loaded.store, loaded.models.cache_root))
        manifest = QueueClient(settings, store=res.store).create_from_job(first, prompts=[prompt])
        assert run_chunk(res, manifest.job_id, 0, 0, task_id="t", node="in-process")["letters"] == "dd"
        return docs(store, manifest.job_id)

    from_store = answer("a green thing")
    assert {d["runtime"]["features"] for d in from_store.values()} == {"store"}
    assert all(not BACKBONE & set(d["timings_s"]) for d in from_store.values())
    for path in store.glob("proposals/*/*/vision.safetensors"):
        path.unlink()
    for path in store.glob("results/*/*/segments.json"):  # the results of that prompt, to compute them again
        if json.loads(path.read_text())["prompts"] == ["a green thing"]:
            shutil.rmtree(path.parent)
    fresh = answer("a green thing")
    assert {d["runtime"]["features"] for d in fresh.values()} == {"computed"}
    loaded.close()
    same = lambda d: {k: v for k, v in d.items() if k not in ("timings_s", "runtime")}  # noqa: E731
    assert [same(d) for d in from_store.values()] == [same(d) for d in fresh.values()]


def test_a_job_for_another_engine_fails_for_now_naming_the_worker_to_start(sam3, tmp_path):
    (path,) = make_images(tmp_path, 1, seed=63)
    proc = invoke_cli(["submit", "segment", str(path), "-p", "a red box", "--sam", "tiny-random", "--clip",
                       "tiny-random", "--wait", "--timeout", "120"], {**sam3["env"], "SLIP_ENGINE": "slip"})
    assert proc.exit_code == 1, proc.stdout + proc.stderr  # EXIT_PARTIAL: the job ended with failures
    (outcome,) = outcomes(store_of(sam3["store"]), job_id_from(proc.stdout)).values()
    assert outcome.error == "ModelMismatchError" and not outcome.permanent
    assert "serves sam=tiny-random-sam3 (engine sam3), but the job asks for sam=tiny-random" in outcome.reason
    assert "start a worker with SLIP_ENGINE=slip SLIP_SAM=tiny-random" in outcome.reason


@pytest.mark.parametrize("args, words", [
    (["--engine", "sam4"], "unknown engine 'sam4'"),
    ([*ENGINE, "--clip", "tiny-random"], "the sam3 engine answers with SAM 3's own scores and uses no ranker"),
    ([*ENGINE, "--propose", "animal"], "--propose names the concept SAM 3 proposes for --engine sam3-rank"),
    ([*ENGINE, "--points-per-side", "8"], "--points-per-side is an option of SAM's automatic mask generator"),
    (["--sam", "tiny-random", "--keep-features"], "--keep-features keeps SAM 3's vision features (--engine sam3)"),
    (["--engine", "sam3", "--sam", "vit_b"], "--engine sam3 needs a SAM 3 checkpoint as --sam"),
    (["--sam", "tiny-random-sam3"], "'tiny-random-sam3' is a SAM 3 checkpoint: run it as an engine"),
])
def test_a_bad_engine_request_is_one_line_and_uploads_nothing(sam3, tmp_path, args, words):
    (path,) = make_images(tmp_path, 1, seed=64)
    store = tmp_path / "store"
    proc = invoke_cli(["submit", "segment", str(path), "-p", "a red box", *args],
                      {**sam3["env"], "SLIP_STORE": str(store), "SLIP_ENGINE": "slip"})
    assert proc.exit_code == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], proc.stderr
    assert not store.exists() or not any(store.rglob("*.*"))
