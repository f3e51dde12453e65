"""Segment once, query many: a new prompt on segmented images reuses the cached proposals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker.ledger import task_records

from queue_helpers import TINY_PARAMS, make_images

pytestmark = pytest.mark.integration
SAM_STAGES = {"sam", "encode", "decode", "postprocess", "filters", "crops", "clip_images"}


def files_under(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_new_prompt_reuses_proposals_and_embeddings(worker, client, tmp_path):
    root = Path(worker["env"]["SLIP_STORE"])
    paths = make_images(tmp_path, 3, seed=21)
    first = client.submit_segment(paths, ["a red box"], TINY_PARAMS, batch_size=3)
    assert client.wait(first, timeout_s=120).counts["done"] == 3
    manifest = client.status(first).manifest
    proposals = {item.index: files_under(root / "proposals" / item.image_sha) for item in manifest.items}
    for index, files in proposals.items():
        names = sorted(Path(k).name for k in files)
        assert len(names) == 2 and names[1] == "segments.json" and names[0].endswith(".safetensors"), names

    second = client.submit_segment(paths, ["a blue disc"], TINY_PARAMS, batch_size=3)
    status = client.wait(second, timeout_s=120)
    assert status.counts["done"] == 3
    for item in manifest.items:
        assert files_under(root / "proposals" / item.image_sha) == proposals[item.index], "proposals were not rewritten"
    old = {s.index: json.loads((root / s.result_key / "segments.json").read_text()) for s in client.status(first).items}
    for state in status.items:
        doc = json.loads((root / state.result_key / "segments.json").read_text())
        assert "sam" in old[state.index]["timings_s"], "the first run did run SAM"
        assert not SAM_STAGES & set(doc["timings_s"]), doc["timings_s"]
        assert {"clip_text", "rank", "load_proposals", "load_embeddings"} <= set(doc["timings_s"])
        assert [s["segmentation"] for s in doc["segments"]] == [s["segmentation"] for s in old[state.index]["segments"]]
        assert doc["prompts"] == ["a blue disc"]
    (record,) = task_records(client.store, second)
    response = client.app.AsyncResult(record.task_id).get(timeout=30)
    assert [i["proposals"] for i in response["items"]] == ["cached"] * 3
