"""Segment once, query many: a new prompt on segmented images reuses the cached proposals and embeddings
(the image is not even read); new crop settings reuse the proposals and add embeddings beside them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from queue_helpers import TINY_PARAMS, all_done, items_of, make_images, outcomes

pytestmark = pytest.mark.integration
SAM_STAGES = {"sam", "encode", "decode", "postprocess", "filters"}  # SAM and the annotation filters
IMAGE_STAGES = {"read_input", "decode_image", "crops", "clip_images"}  # the image read, cropped and embedded


def files_under(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


def without_similarity(doc: dict) -> list[dict]:
    return [{k: v for k, v in segment.items() if k != "similarity"} for segment in doc["segments"]]


def run(client, paths, prompt: str, **params) -> tuple[str, dict]:
    job = client.submit_segment(paths, [prompt], {**TINY_PARAMS, **params}, batch_size=3)
    assert client.wait(job, timeout_s=120, poll_s=0.3).counts == all_done(len(paths))
    return job, outcomes(client.store, job)


def test_new_prompt_reuses_proposals_and_embeddings(worker, client, tmp_path):
    root = Path(worker["env"]["SLIP_STORE"])
    paths = make_images(tmp_path, 3, seed=21)
    first, computed = run(client, paths, "a red box")
    items = items_of(client.store, first)
    assert {o.how for o in computed.values()} == {"computed"}
    proposals = {item.index: files_under(root / "proposals" / item.image_sha) for item in items}
    for files in proposals.values():
        names = sorted(Path(k).name for k in files)
        assert len(names) == 2 and names[1] == "segments.json" and names[0].endswith(".safetensors"), names

    second, cached = run(client, paths, "a blue disc")
    assert {o.how for o in cached.values()} == {"cached"}
    for item in items:
        assert files_under(root / "proposals" / item.image_sha) == proposals[item.index], "the cache was not rewritten"
        old = json.loads((root / computed[item.index].result_key / "segments.json").read_text())
        doc = json.loads((root / cached[item.index].result_key / "segments.json").read_text())
        assert SAM_STAGES <= set(old["timings_s"]) and IMAGE_STAGES <= set(old["timings_s"]), "the first run did the work"
        assert not (SAM_STAGES | IMAGE_STAGES) & set(doc["timings_s"]), doc["timings_s"]
        assert {"load_cache", "clip_text", "rank"} <= set(doc["timings_s"])
        assert "write_result" in cached[item.index].timings_s and not SAM_STAGES & set(cached[item.index].timings_s)
        assert doc["runtime"]["proposals"] == "cached" and doc["prompts"] == ["a blue disc"]
        assert without_similarity(doc) == without_similarity(old), "the stored segments, as they are"
        assert old["request"]["generator"] == doc["request"]["generator"]
        assert doc["request_digest"] != old["request_digest"], "another prompt is another result"


def test_new_crop_settings_reuse_the_proposals_and_add_embeddings(worker, client, tmp_path):
    root = Path(worker["env"]["SLIP_STORE"])
    paths = make_images(tmp_path, 2, seed=22)
    first, _ = run(client, paths, "a red box")
    items = items_of(client.store, first)
    segments = {i.index: (root / "proposals" / i.image_sha).rglob("segments.json") for i in items}
    segments = {index: [(p, p.stat().st_mtime_ns) for p in found] for index, found in segments.items()}
    _, gray = run(client, paths, "a red box", crop_background="gray")
    assert {o.how for o in gray.values()} == {"cached"}, "the proposals were reused"
    for item in items:
        folder = root / "proposals" / item.image_sha
        assert [(p, p.stat().st_mtime_ns) for p in folder.rglob("segments.json")] == segments[item.index]
        assert len(list(folder.rglob("*.safetensors"))) == 2, "one embeddings file per crop setting"
        doc = json.loads((root / gray[item.index].result_key / "segments.json").read_text())
        assert "crops" in doc["timings_s"] and not SAM_STAGES & set(doc["timings_s"])
