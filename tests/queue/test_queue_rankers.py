"""Rankers on demand and job-to-job re-answers, through the session's real worker (tiny-random models):

* ``slip submit segment --from-job JOB --clip DIR`` builds a new job over JOB's images (no local path, nothing
  uploaded but the ranker), the ranker directory uploaded content-addressed (``store:rankers/<digest>``); the
  worker, which keeps its SAM warm, loads that ranker on first use (a small LRU) and re-answers from the cached
  proposals; the new ranker's digest keys the new results, the old results stay as they were;
* ``--clip job:<train job>`` is the best cell of a ranker trained through the queue;
* every bad request is one line before anything is submitted; a ranker gone from the store fails its images for
  good, naming it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from queue_helpers import TINY_PARAMS, all_done, invoke_cli, job_id_from, make_images, outcomes

pytestmark = pytest.mark.integration
TINY = "tiny-random"  # the worker's own ranker (names.TINY)
SAM_STAGES = {"sam", "encode", "decode", "filters"}


@pytest.fixture(scope="module")
def rankers(tmp_path_factory) -> dict[int, Path]:
    """Three tiny CLIP directories saved from seeded random weights (seeds 1, 2, 3)."""
    from slip.rankers.hf_clip import build_tiny_clip, save_hf_clip

    root = tmp_path_factory.mktemp("rankers")
    return {seed: save_hf_clip(*build_tiny_clip(seed=seed), root / f"clip-{seed}") for seed in (1, 2, 3)}


@pytest.fixture(scope="module")
def first(worker, client, tmp_path_factory) -> str:
    """A finished job of 3 images with the worker's own ranker."""
    paths = make_images(tmp_path_factory.mktemp("first"), 3, seed=81)
    job = client.submit_segment(paths, ["a red box"], TINY_PARAMS, batch_size=2)
    assert client.wait(job, timeout_s=120, poll_s=0.2).counts == all_done(3)
    return job


def sha256_of(path: Path) -> str:
    from slip.rankers.loading import load_ranker_bundle

    return load_ranker_bundle(str(path), device="cpu").ref.sha256


def results(client, job: str) -> dict[int, dict]:
    found = sorted(outcomes(client.store, job).items())
    return {i: client.store.get_json(f"{o.result_key}/segments.json") for i, o in found}


def one_line(proc) -> str:
    assert proc.exit_code == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stdout, proc.stderr
    return lines[0]


def test_from_job_with_a_local_ranker_re_answers_from_cached_proposals_under_new_keys(worker, client, first,
                                                                                      rankers):
    root = Path(worker["env"]["SLIP_STORE"])
    old = results(client, first)
    old_files = {p: p.read_bytes() for p in root.glob("results/*/*/*")}
    proc = invoke_cli(["submit", "segment", "--from-job", first, "--clip", str(rankers[1]), "--wait", "--timeout",
                       "120"], worker["env"])
    assert proc.exit_code == 0, proc.stdout + proc.stderr
    job = job_id_from(proc.stdout)
    manifest = client.status(job).manifest
    assert manifest.spec["clip"].startswith("store:rankers/") and manifest.spec["prompts"] == ["a red box"]
    assert manifest.spec["options"] == client.status(first).manifest.spec["options"]  # same options
    assert (root / (manifest.spec["clip"][len("store:"):] + ".json")).is_file(), "uploaded, marked complete"
    new = results(client, job)
    assert [o.how for _, o in sorted(outcomes(client.store, job).items())] == ["cached"] * 3
    for index, doc in new.items():
        assert not SAM_STAGES & set(doc["timings_s"]), doc["timings_s"]  # SAM did not run again
        assert doc["request"]["ranker"]["sha256"] == sha256_of(rankers[1])  # the digest of what the producer had
        assert doc["request"]["ranker"]["spec"] == manifest.spec["clip"]
        assert doc["request_digest"] != old[index]["request_digest"]
        assert [s["segmentation"] for s in doc["segments"]] == [s["segmentation"] for s in old[index]["segments"]]
    assert all(p.read_bytes() == data for p, data in old_files.items()), "the old results stay as they were"
    health = client.health(worker["node"])
    assert health["clip"]["spec"] == "tiny-random"  # SLIP_CLIP's ranker stays loaded
    assert sha256_of(rankers[1]) in {r["sha256"] for r in health["rankers_on_demand"]}
    # the same re-answer again: the ranker is not uploaded again, every result exists already
    mtimes = {p: p.stat().st_mtime_ns for p in root.glob("rankers/**/*") if p.is_file()}
    again = client.submit_from_job(first, clip=str(rankers[1]))
    assert client.wait(again, timeout_s=120, poll_s=0.2).counts == all_done(3)
    assert {o.how for o in outcomes(client.store, again).values()} == {"existing"}
    assert {p: p.stat().st_mtime_ns for p in root.glob("rankers/**/*") if p.is_file()} == mtimes


def test_a_ranker_trained_through_the_queue_is_named_by_its_job_and_rankers_stay_few(worker, client, first,
                                                                                     rankers):
    """A train job's record as train workers write it (cells' checkpoints in the store, their validation losses):
    ``job:<id>`` names the best cell. Three rankers on demand in a row: the worker keeps at most two."""
    from jobs.ledger import write_job
    from jobs.model import Item, JobManifest, new_job_id
    from jobs.training import STORE_SPEC, cell_prefix, put_directory
    from slip.timing import utc_now
    from worker.models import RANKER_CACHE

    train = new_job_id()
    write_job(client.store, JobManifest(job_id=train, kind="train", created=utc_now(), spec={}, batch_size=1, total=2,
                                        page_size=JobManifest.page_size_for(1)),
              [Item(index=0, request={}), Item(index=1, request={})])
    for cell, (seed, loss) in enumerate(((2, 0.9), (3, 0.3))):
        put_directory(client.store, rankers[seed], f"{cell_prefix(train, cell)}/ranker")
        checkpoint = f"{STORE_SPEC}{cell_prefix(train, cell)}/ranker"
        client.store.put_json(f"{cell_prefix(train, cell)}/result.json",
                              {"cell": cell, "best_val_loss": loss, "checkpoint": checkpoint})
    job = client.submit_from_job(first, clip=f"job:{train}")
    assert client.status(job).manifest.spec["clip"] == f"{STORE_SPEC}{cell_prefix(train, 1)}/ranker"
    assert client.wait(job, timeout_s=120, poll_s=0.2).counts == all_done(3)
    assert {d["request"]["ranker"]["sha256"] for d in results(client, job).values()} == {sha256_of(rankers[3])}
    other = client.submit_from_job(first, clip=str(rankers[2]))
    assert client.wait(other, timeout_s=120, poll_s=0.2).counts == all_done(3)
    loaded = client.health(worker["node"])["rankers_on_demand"]
    assert len(loaded) == RANKER_CACHE == 2 and loaded[-1]["sha256"] == sha256_of(rankers[2])


@pytest.mark.parametrize("args, words", [
    (["--from-job", "20990101-000000-abcdef"], "no job '20990101-000000-abcdef' in store"),
    (["--from-job", "not a job id"], "is not a job id"),
    (["--from-job", "{first}", "IMAGE"], "--from-job takes the old job's images: give no PATH"),
    ([], "give the images (PATH ...) and at least one --prompt, or --from-job JOB"),
    (["IMAGE", "-p", "x", "--clip", "store:rankers/" + "0" * 64], "is not in the store"),
    (["IMAGE", "-p", "x", "--clip", "job:20990101-000000-abcdef"], "no job '20990101-000000-abcdef' in store"),
    (["IMAGE", "-p", "x", "--clip", "job:{first}"], "names a segment job: a ranker comes from a train job"),
    (["--from-job", "{first}", "--threshold", "0.1", "--threshold", "0.2"], "thresholds"),
    (["IMAGE", "-p", "x", "--clip", "FOLDER"], "holds no ranker (expected config.json"),  # a folder of images
])
def test_bad_requests_are_one_line_and_submit_nothing(worker, client, first, tmp_path, args, words):
    (image,) = make_images(tmp_path, 1, seed=82)
    before = len(client.jobs(limit=1000))
    args = [a.replace("{first}", first).replace("IMAGE", str(image)).replace("FOLDER", str(tmp_path)) for a in args]
    line = one_line(invoke_cli(["submit", "segment", *args], worker["env"]))
    assert words in line, line
    assert len(client.jobs(limit=1000)) == before


def test_a_ranker_name_wins_over_a_folder_called_so(worker, client, first, tmp_path, monkeypatch):
    """``--clip tiny-random`` run where a folder of that name is (a dataset, say): the name, as the worker loads
    it; nothing of the folder is uploaded as a ranker."""
    make_images(tmp_path / TINY, 2, seed=83)
    monkeypatch.chdir(tmp_path)
    rankers_before = set(client.store.list("rankers"))
    proc = invoke_cli(["submit", "segment", "--from-job", first, "--clip", TINY], worker["env"])
    assert proc.exit_code == 0, proc.stdout + proc.stderr
    job = job_id_from(proc.stdout)
    assert client.status(job).manifest.spec["clip"] == TINY
    assert client.wait(job, timeout_s=120, poll_s=0.2).counts == all_done(3)
    assert set(client.store.list("rankers")) == rankers_before


def test_a_ranker_gone_from_the_store_fails_its_images_for_good_naming_it(worker, client, first, tmp_path):
    import shutil

    from slip.rankers.hf_clip import build_tiny_clip, save_hf_clip

    root = Path(worker["env"]["SLIP_STORE"])
    ranker = save_hf_clip(*build_tiny_clip(seed=4), tmp_path / "clip-4")  # a ranker the worker never loaded
    manifest = client.create_from_job(first, clip=str(ranker))
    prefix = manifest.spec["clip"][len("store:"):]
    shutil.rmtree(root / prefix)
    (root / f"{prefix}.json").unlink()
    job = client.start(manifest, window=4)
    status = client.wait(job, timeout_s=120, poll_s=0.2)
    assert status.counts["failed"] == 3
    for outcome in outcomes(client.store, job).values():
        assert outcome.permanent and outcome.error == "WeightsNotFoundError"
        assert outcome.reason.startswith(f"ranker {manifest.spec['clip']} is not in the store")
