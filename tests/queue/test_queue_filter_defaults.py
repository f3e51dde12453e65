"""SegmentParams.filters defaults to the worker SAM's recommended chain (its filters.json), else the paper's
``containment``; the proposals cache is keyed by the resolved chain. The worker part runs in-process on real
resources: a tiny-random SAM saved as a checkpoint with a generator.json and a filters.json beside it, a real
directory store."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slip.sam import FILTERS_FILE, GENERATOR_FILE, SAM_ARCHS, TINY_SPEC, build_tiny_sam, save_sam
from worker.jobs import SegmentParams
from worker.proposals import proposals_key
from worker.resources import load_resources
from worker.settings import Settings

from queue_helpers import make_images, queue_env

DB = 10  # never touched: process_item runs without Redis, but the settings need a broker URL
# a 2x2 point grid with no score thresholds: the tiny-random SAM returns masks, fast
GENERATOR = {"points_per_side": 2, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 1.0}
KEEP_LARGEST = "containment:drop_largest=false"


# --- SegmentParams --------------------------------------------------------------------------------------


def test_filters_default_to_none_and_resolve_with_the_recommendation():
    assert SegmentParams().filters is None
    assert SegmentParams().filter_chain(None) == "containment"
    assert SegmentParams().filter_chain(KEEP_LARGEST) == KEEP_LARGEST
    assert SegmentParams(filters="none").filter_chain(KEEP_LARGEST) == "none"


def test_proposal_identity_uses_the_resolved_chain():
    def identity(params: SegmentParams, recommended: str | None) -> dict:
        return params.proposal_identity("synth", params.generator_options({}), params.filter_chain(recommended))

    # the same effective chain shares an identity, however it was reached or spelt
    assert identity(SegmentParams(), KEEP_LARGEST) == identity(SegmentParams(filters=KEEP_LARGEST), None)
    assert identity(SegmentParams(), KEEP_LARGEST) == identity(SegmentParams(filters="containment:0.8:drop_largest=false"), None)
    assert identity(SegmentParams(), None) == identity(SegmentParams(filters="containment"), KEEP_LARGEST)
    # different effective chains never do
    assert identity(SegmentParams(), KEEP_LARGEST) != identity(SegmentParams(), None)
    assert identity(SegmentParams(filters="none"), KEEP_LARGEST) != identity(SegmentParams(), KEEP_LARGEST)
    assert identity(SegmentParams(filters="containment:0.9"), None) != identity(SegmentParams(), None)


def test_submit_help_names_the_defaults_and_survives_typer():
    from producer.cli import app  # registers the queue commands on the `slip` app

    result = CliRunner().invoke(app, ["submit", "segment", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.replace("│", " ").split())  # the help as one line, whatever the wrapping
    assert "(default: $SLIP_SAM or vit_b)" in text and "(default: $SLIP_CLIP)" in text
    assert "recommended chain (filters.json beside the checkpoint), else the paper's" in text


# --- the worker ---------------------------------------------------------------------------------------


@pytest.fixture()
def resources(tmp_path):
    checkpoint = tmp_path / "tiny-sam"
    save_sam(build_tiny_sam(), checkpoint / "sam.pth", SAM_ARCHS[TINY_SPEC])
    (checkpoint / GENERATOR_FILE).write_text(json.dumps(GENERATOR))
    (checkpoint / FILTERS_FILE).write_text(json.dumps({"filters": KEEP_LARGEST, "why": "test"}))
    env = queue_env(tmp_path / "store", db=DB, SLIP_SAM=str(checkpoint), SLIP_CACHE=str(tmp_path / "cache"))
    res = load_resources(Settings.from_env(env), load_models=True)
    yield res
    res.close()


def segment(res, image: Path, prompt: str, **params):
    from producer.client import QueueClient
    from worker.processing import process_item

    manifest = QueueClient(res.settings, store=res.store).create_job([image], [prompt], params)
    item = manifest.items[0]
    return manifest.spec, item, process_item(res, manifest.spec, item, points_per_batch=None)


def test_worker_loads_the_recommendation_once_and_reports_it(resources):
    assert resources.recommended_filters == KEEP_LARGEST
    assert resources.health()["recommended_filters"] == KEEP_LARGEST
    (default,) = resources.pipeline(SegmentParams()).filters
    assert default.params()["drop_largest"] is False
    assert resources.pipeline(SegmentParams(filters="none")).filters == ()


def test_worker_records_and_keys_proposals_by_the_resolved_chain(resources, tmp_path):
    image = make_images(tmp_path / "images", 1, seed=40)[0]
    spec, item, record = segment(resources, image, "a red box")
    assert spec.params.filters is None  # the request leaves it to the worker
    assert record.status == "done" and record.proposals == "computed"
    doc = resources.store.get_json(f"{record.result_key}/segments.json")
    assert doc["params"]["filters"] == KEEP_LARGEST  # the resolved chain is reported
    assert [f["params"]["drop_largest"] for f in doc["filters"]] == [False]  # and is what ran
    key = proposals_key(spec, item, resources.generator_options(spec.params), resources.filter_chain(spec.params))
    assert resources.store.get_json(key)["identity"]["filters"][0]["drop_largest"] is False

    # the same effective chain asked for explicitly: the cached proposals are reused
    _, _, same = segment(resources, image, "a blue disc", filters=KEEP_LARGEST)
    assert same.status == "done" and same.proposals == "cached" and same.segments == record.segments
    # the paper's chain asked for explicitly: never served from that cache
    _, _, paper = segment(resources, image, "a red box", filters="containment")
    assert paper.status == "done" and paper.proposals == "computed" and paper.result_key != record.result_key
    paper_doc = resources.store.get_json(f"{paper.result_key}/segments.json")
    assert paper_doc["params"]["filters"] == "containment"
    assert [f["params"]["drop_largest"] for f in paper_doc["filters"]] == [True]


def test_queue_evaluation_with_the_warm_sam_uses_its_recommended_chain(resources, tmp_path):
    from slip.data.synth import generate_dataset
    from worker.train_tasks import EvaluateRequest, run_evaluate, upload_directory

    dataset = generate_dataset(tmp_path / "ds", classes=4, per_class=5, size=32, seed=0)
    request = EvaluateRequest(job_id="filter-defaults", ranker_index=0, ranker="tiny-random", chunk=0, start=0,
                              stop=1, dataset=upload_directory(resources.store, dataset), tile_size=32, proposals="sam")

    def chosen(res) -> list:
        doc = res.store.get_json(run_evaluate(res, request)["key"])
        return [r["chosen"] for r in doc["results"]]

    assert any(c is not None for c in chosen(resources))
    # control: a recommended chain that drops every segment leaves nothing to choose from
    assert all(c is None for c in chosen(replace(resources, recommended_filters="min_area:100000")))


def test_a_bad_filter_chain_is_refused_at_submit_and_nothing_is_uploaded(tmp_path):
    from queue_helpers import run_cli

    with pytest.raises(ValueError, match="keep must be 'parent' or 'child'"):
        SegmentParams(filters="containment:keep=sideways")
    store = tmp_path / "store"
    (image,) = make_images(tmp_path / "images", 1)
    proc = run_cli(["submit", "segment", str(image), "--prompt", "disc", "--filters", "containment:keep=sideways"],
                   queue_env(store, db=11))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "keep must be 'parent' or 'child'" in proc.stderr and "Traceback" not in proc.stderr
    assert not store.exists() or not any(store.rglob("*.*"))
