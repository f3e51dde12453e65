"""A cheap re-query through a real worker: a new prompt on images whose proposals and embeddings are cached.

With a private ``redis-server`` (its own port: no other test's worker can take these tasks), one real
``celery -A worker worker`` (tiny-random models) and the producer's ``QueueClient``:

* after a first job, every input object in the store is overwritten with bytes that are not an image: a
  re-query with another prompt still succeeds (any read of an input would fail to decode), reports the
  cached proposals, and writes ``segments.json`` alone (no PNG without ``--render``);
* its result equals, segment for segment and match for match, a fresh computation of the same prompt from
  an empty cache (everything but the timings and the runtime note of how the proposals were obtained);
* ``--render`` on that existing result renders the PNGs lazily (the result's ``segments.json`` untouched;
  the mask PNG is the chosen segment's RLE), and ``--render`` on a re-query writes them at once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from queue_helpers import (TINY_PARAMS, bench_module, make_images, outcomes, queue_env, start_worker, stop_worker,
                           wait_worker_ready)

pytestmark = pytest.mark.integration
NOT_AN_IMAGE = b"this is not an image: a re-query must not read it"
PROMPT_A, PROMPT_B, PROMPT_C = "a red box", "a blue disc", "a green thing"


# --- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def private_redis() -> Iterator[int]:
    """A redis-server of this module's own on a free loopback port (no persistence); yields the port."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: run `bash scripts/setup.sh`")
    with bench_module("servers").private_redis() as url:
        yield int(url.rsplit(":", 1)[1].split("/")[0])


@pytest.fixture(scope="module")
def setup(private_redis, tmp_path_factory) -> Iterator[dict]:
    """One real worker (gpu + cpu queues, tiny-random models) on the private Redis; a client; the store root."""
    from producer.client import QueueClient
    from jobs.settings import Settings

    store = tmp_path_factory.mktemp("requery-store")
    env = queue_env(store, db=0, port=private_redis, SLIP_CACHE=str(tmp_path_factory.mktemp("requery-cache")))
    log = tmp_path_factory.mktemp("requery-logs") / "requery.log"
    process = start_worker(env, ("gpu", "cpu"), "requery", log_path=log)
    try:
        wait_worker_ready(env, "requery", process=process)
    except RuntimeError as e:
        stop_worker(process, timeout_s=5)
        pytest.fail(f"{e}\n--- worker log ---\n{log.read_text(errors='replace')[-4000:]}")
    try:
        yield {"client": QueueClient(Settings.from_env(env)), "store": store, "log": log}
    finally:
        stop_worker(process)


# --- helpers ----------------------------------------------------------------------------------------------


def run(setup: dict, paths: list[Path], prompt: str, **params) -> list:
    """Submit ``paths`` with ``prompt`` (one chunk), wait, and return the item outcomes in index order (all done)."""
    client = setup["client"]
    job = client.submit_segment(paths, [prompt], {**TINY_PARAMS, **params}, batch_size=len(paths))
    status = client.wait(job, timeout_s=180, poll_s=0.2)
    found = [o for _, o in sorted(outcomes(client.store, job).items())]
    assert status.counts["done"] == len(paths), (
        [o.reason for o in found if o.state != "done"], setup["log"].read_text(errors="replace")[-3000:])
    return found


def files_of(setup: dict, outcome) -> dict[str, bytes]:
    folder = setup["store"] / outcome.result_key
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def without_timings(doc: dict) -> dict:
    """The document minus what may differ between two computations of one result: the timings and the
    runtime note (points_per_batch, how the proposals were obtained)."""
    return {k: v for k, v in doc.items() if k not in ("timings_s", "runtime")}


# --- the test -------------------------------------------------------------------------------------------------


def test_requery_reads_no_image_writes_only_json_and_equals_a_fresh_computation(setup, tmp_path):
    store: Path = setup["store"]
    paths = make_images(tmp_path / "images", 3, seed=41)
    # 1. the first segment of the images (prompt A): proposals and embeddings are cached
    first = run(setup, paths, PROMPT_A)
    assert [o.how for o in first] == ["computed"] * 3
    inputs = sorted((store / "inputs").iterdir())
    assert len(inputs) == 3
    originals = {p: p.read_bytes() for p in inputs}

    # 2. no input may be read from now on: each becomes bytes no decoder accepts (kept, so nothing is uploaded)
    for p in inputs:
        p.write_bytes(NOT_AN_IMAGE)
    requery = run(setup, paths, PROMPT_B)
    assert [o.how for o in requery] == ["cached"] * 3
    for outcome in requery:
        assert {"read_input", "decode_image", "sam", "crops", "clip_images"}.isdisjoint(outcome.timings_s), outcome.timings_s
        assert "load_cache" in outcome.timings_s
        assert list(files_of(setup, outcome)) == ["segments.json"], "a re-query without --render wrote a PNG"
    assert all(p.read_bytes() == NOT_AN_IMAGE for p in inputs), "an input was uploaded again"
    requeried = {o.index: json.loads(files_of(setup, o)["segments.json"]) for o in requery}
    for index, doc in requeried.items():
        assert doc["prompts"] == [PROMPT_B] and doc["runtime"]["proposals"] == "cached"
        assert doc["segments"], "tiny-random proposals with score thresholds 0 cannot be empty"

    # 3. the same prompt computed afresh: empty cache, no results, the inputs restored
    shutil.rmtree(store / "proposals")
    shutil.rmtree(store / "results")
    for p, data in originals.items():
        p.write_bytes(data)
    fresh = run(setup, paths, PROMPT_B)
    assert [o.how for o in fresh] == ["computed"] * 3
    assert [o.result_key for o in fresh] == [o.result_key for o in requery], "one request, one result key"
    for outcome in fresh:
        files = files_of(setup, outcome)
        assert list(files) == ["segments.json"]
        doc = json.loads(files["segments.json"])
        assert without_timings(doc) == without_timings(requeried[outcome.index]), f"image {outcome.index} differs"
        assert [s["segmentation"]["counts"] for s in doc["segments"]] == \
               [s["segmentation"]["counts"] for s in requeried[outcome.index]["segments"]]

    # 4. --render on the existing result: the PNGs are rendered now, segments.json is left as it was
    before = {o.index: files_of(setup, o)["segments.json"] for o in fresh}
    rendered = run(setup, paths, PROMPT_B, render=True)
    assert [o.how for o in rendered] == ["existing"] * 3
    for outcome in rendered:
        files = files_of(setup, outcome)
        assert set(files) == {"segments.json", "mask_0.png", "overlay_0.png"}
        assert files["segments.json"] == before[outcome.index]
        doc = json.loads(files["segments.json"])
        expected = np.zeros((doc["image_size"]["height"], doc["image_size"]["width"]), bool)
        for instance in doc["matches"][0]["instances"]:
            rle = doc["segments"][instance["segment"]]["segmentation"]
            expected |= mask_utils.decode([{"size": rle["size"], "counts": rle["counts"].encode()}])[:, :, 0].astype(bool)
        mask = np.asarray(Image.open(setup["store"] / outcome.result_key / "mask_0.png"))
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        assert np.array_equal(mask == 255, expected)

    # 5. --render on a re-query (another prompt): the PNGs come with the result
    for outcome in run(setup, paths, PROMPT_C, render=True):
        assert outcome.how == "cached"
        assert set(files_of(setup, outcome)) == {"segments.json", "mask_0.png", "overlay_0.png"}
