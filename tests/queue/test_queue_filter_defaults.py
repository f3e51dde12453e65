"""A job's filter chain defaults to the worker SAM's recommended chain (its filters.json), else the paper's
``containment``; the worker resolves it (slip.request.resolve) and keys the proposals cache by the resolved
chain. The worker part runs in-process on real resources (the code a worker process runs at start-up): a
tiny-random SAM saved as a checkpoint with a generator.json and a filters.json beside it, a real directory
store."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jobs.segment import SegmentSpec
from jobs.settings import Settings
from slip.errors import ConfigError
from slip.options import SegmentOptions
from slip.request import canonical_filters
from slip.sam import FILTERS_FILE, GENERATOR_FILE, SAM_ARCHS, TINY_SPEC, build_tiny_sam, save_sam
from worker.processing import process_item
from worker.proposals import proposals_key
from worker.resources import load_resources

from queue_helpers import invoke_cli, items_of, make_images, queue_env
import redis_dbs

DB = redis_dbs.FAILURE_POLICY  # process_item needs no Redis; the settings need a broker URL
# a 2x2 point grid with no score thresholds: the tiny-random SAM returns masks, fast
GENERATOR = {"points_per_side": 2, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 1.0}
KEEP_LARGEST = "containment:drop_largest=false"


# --- SegmentOptions --------------------------------------------------------------------------------------


def test_filters_default_to_none_and_the_worker_resolves_them():
    assert SegmentOptions().filters is None
    assert SegmentOptions(filters=KEEP_LARGEST).filters == KEEP_LARGEST
    assert SegmentOptions(filters="none").filters == "none"


def test_submit_help_names_the_defaults_and_survives_typer():
    from producer.cli import build_app

    result = CliRunner().invoke(build_app(), ["submit", "segment", "--help"], env={"COLUMNS": "300"})
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
    res = load_resources(Settings.from_env(env), load_models=True, send=lambda *args, **kw: None)
    yield res
    res.close()


def segment(res, image: Path, prompt: str, **params):
    """One image through the worker's own steps: resolve the job's options, assemble the pipeline, process."""
    from producer.client import QueueClient

    manifest = QueueClient(res.settings, store=res.store).create_job([image], [prompt], params)
    (item,) = items_of(res.store, manifest.job_id)
    spec = SegmentSpec.model_validate(manifest.spec)
    engine = res.engine(spec.options)
    return spec, item, engine.request, process_item(res.store, engine, spec, item)


def test_worker_loads_the_recommendation_once_and_reports_it(resources):
    assert resources.sam.filters == KEEP_LARGEST
    assert resources.health()["recommended_filters"] == KEEP_LARGEST
    (default,) = resources.engine(SegmentOptions()).filters
    assert default.params()["drop_largest"] is False
    assert resources.engine(SegmentOptions(filters="none")).filters == ()
    assert resources.engine(SegmentOptions()) is resources.engine(SegmentOptions()), "assembled once per request"


def test_worker_records_and_keys_proposals_by_the_resolved_chain(resources, tmp_path):
    image = make_images(tmp_path / "images", 1, seed=40)[0]
    spec, item, request, outcome = segment(resources, image, "a red box")
    assert spec.options.filters is None  # the job leaves it to the worker
    assert outcome.state == "done" and outcome.how == "computed"
    doc = resources.store.get_json(f"{outcome.result_key}/segments.json")
    assert doc["request"]["filters"] == list(canonical_filters(KEEP_LARGEST))  # the resolved chain is recorded
    assert [f["params"]["drop_largest"] for f in doc["filters"]] == [False]  # and is what ran
    cached = resources.store.get_json(proposals_key(item.image_sha, request))
    assert cached["identity"]["filters"][0]["drop_largest"] is False

    # the same effective chain asked for explicitly (however spelt): the cached proposals are reused
    _, _, same_request, same = segment(resources, image, "a blue disc", filters="containment:0.8:drop_largest=false")
    assert same.state == "done" and same.how == "cached"
    assert same_request.proposal_digest() == request.proposal_digest()
    same_doc = resources.store.get_json(f"{same.result_key}/segments.json")
    assert [s["segmentation"] for s in same_doc["segments"]] == [s["segmentation"] for s in doc["segments"]]
    # the paper's chain asked for explicitly: never served from that cache
    _, _, paper_request, paper = segment(resources, image, "a red box", filters="containment")
    assert paper.state == "done" and paper.how == "computed" and paper.result_key != outcome.result_key
    paper_doc = resources.store.get_json(f"{paper.result_key}/segments.json")
    assert paper_doc["request"]["filters"] == list(canonical_filters("containment"))
    assert [f["params"]["drop_largest"] for f in paper_doc["filters"]] == [True]


def test_queue_evaluation_with_the_warm_sam_uses_its_recommended_chain(resources, tmp_path):
    from slip.data.synth import generate_dataset
    from jobs.training import EvaluateRequest, upload_directory
    from worker.train_tasks import run_evaluate

    dataset = generate_dataset(tmp_path / "ds", classes=4, per_class=5, size=32, seed=0)
    request = EvaluateRequest(job_id="filter-defaults", ranker_index=0, ranker="tiny-random", chunk=0, start=0,
                              stop=1, dataset=upload_directory(resources.store, dataset), tile_size=32, proposals="sam")

    def chosen(res) -> list:
        doc = res.store.get_json(run_evaluate(res, request)["key"])
        return [r["chosen"] for r in doc["results"]]

    assert any(c is not None for c in chosen(resources))
    # control: a recommended chain that drops every segment leaves nothing to choose from
    drop_all = replace(resources, sam=replace(resources.sam, filters="min_area:100000"))
    assert all(c is None for c in chosen(drop_all))


def test_a_bad_filter_chain_is_refused_at_submit_and_nothing_is_uploaded(tmp_path):
    with pytest.raises(ConfigError, match="keep must be 'parent' or 'child'"):
        SegmentOptions.parse({"filters": "containment:keep=sideways"})
    store = tmp_path / "store"
    (image,) = make_images(tmp_path / "images", 1)
    proc = invoke_cli(["submit", "segment", str(image), "--prompt", "disc", "--filters", "containment:keep=sideways"],
                      queue_env(store, db=DB))
    assert proc.exit_code == 2, proc.stdout + proc.stderr
    assert "keep must be 'parent' or 'child'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not store.exists() or not any(store.rglob("*.*"))


def test_the_rankers_calibrated_threshold_reaches_the_workers_results(tmp_path):
    """threshold.json beside the worker's ranker: the default of every job, recorded in its results; an
    explicit threshold wins; --no-threshold ignores it."""
    from slip.rankers.hf_clip import build_tiny_clip, save_hf_clip

    ranker = save_hf_clip(*build_tiny_clip(seed=0), tmp_path / "tiny-clip")
    (ranker / "threshold.json").write_text(json.dumps({"threshold": 0.99, "metric": "f1"}))
    env = queue_env(tmp_path / "store", db=DB, SLIP_SAM="tiny-random", SLIP_CLIP=str(ranker),
                    SLIP_CACHE=str(tmp_path / "cache"))
    res = load_resources(Settings.from_env(env), load_models=True, send=lambda *args, **kw: None)
    try:
        assert res.ranker.threshold == 0.99 and res.health()["recommended_threshold"] == 0.99
        image = make_images(tmp_path / "images", 1, seed=41)[0]
        grid = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "filters": "none"}
        _, _, calibrated, outcome = segment(res, image, "a red box", **grid)
        assert calibrated.threshold == 0.99 and outcome.state == "done" and outcome.found == [0]
        (match,) = res.store.get_json(f"{outcome.result_key}/segments.json")["matches"]
        assert match["threshold"] == 0.99 and match["instances"] == [] and match["best"]["score"] < 0.99
        _, _, explicit, lowered = segment(res, image, "a red box", threshold=-1.0, **grid)
        assert explicit.threshold == -1.0 and lowered.found == [1] and lowered.how == "cached"
        _, _, ignored, plain = segment(res, image, "a red box", calibrated=False, **grid)
        assert ignored.threshold is None and plain.found == [1]
        assert len({outcome.result_key, lowered.result_key, plain.result_key}) == 3
    finally:
        res.close()
