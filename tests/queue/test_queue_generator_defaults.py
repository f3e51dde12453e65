"""A job's SAM options default to the worker SAM's recommendation (its generator.json); the worker resolves
them (slip.request.resolve) and keys the proposals cache by the resolved options. The worker part runs
in-process on real resources (the code a worker process runs at start-up): a tiny-random SAM saved as a
checkpoint with a generator.json beside it, a real directory store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.segment import SegmentSpec
from jobs.settings import Settings
from slip.errors import ConfigError
from slip.options import SegmentOptions
from slip.sam import GENERATOR_FILE, SAM_ARCHS, TINY_SPEC, build_tiny_sam, save_sam
from worker.processing import process_item
from worker.proposals import proposals_key
from worker.resources import load_resources

from queue_helpers import items_of, make_images, queue_env
import redis_dbs

DB = redis_dbs.FAILURE_POLICY  # process_item needs no Redis; the settings need a broker URL
# a 2x2 point grid with no score thresholds: the tiny-random SAM returns masks, fast
GENERATOR_FIELDS = ("points_per_side", "pred_iou_thresh", "stability_score_thresh", "box_nms_thresh")
RECOMMENDED = {"points_per_side": 2, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 1.0}


# --- SegmentOptions --------------------------------------------------------------------------------------


def test_sam_options_default_to_none_and_only_given_ones_reach_the_request():
    options = SegmentOptions()
    assert all(getattr(options, name) is None for name in GENERATOR_FIELDS)
    assert options.generator_overrides() == {}
    assert SegmentOptions(points_per_side=8, box_nms_thresh=0.5).generator_overrides() == {"points_per_side": 8,
                                                                                          "box_nms_thresh": 0.5}


@pytest.mark.parametrize("bad", [{"points_per_side": 0}, {"points_per_side": 257}, {"pred_iou_thresh": 1.5},
                                 {"stability_score_thresh": -0.1}, {"box_nms_thresh": 2.0}])
def test_given_sam_options_keep_their_bounds(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        SegmentOptions.parse(bad)


# --- the worker ---------------------------------------------------------------------------------------


@pytest.fixture()
def resources(tmp_path):
    checkpoint = tmp_path / "tiny-sam"
    save_sam(build_tiny_sam(), checkpoint / "sam.pth", SAM_ARCHS[TINY_SPEC])
    (checkpoint / GENERATOR_FILE).write_text(json.dumps(RECOMMENDED))
    env = queue_env(tmp_path / "store", db=DB, SLIP_SAM=str(checkpoint), SLIP_CACHE=str(tmp_path / "cache"))
    res = load_resources(Settings.from_env(env), load_models=True, send=lambda *args, **kw: None)
    yield res
    res.close()


def segment(res, image: Path, prompt: str, **params):
    """One image through the worker's own steps: resolve the job's options, assemble the pipeline, process."""
    from producer.client import QueueClient

    manifest = QueueClient(res.settings, store=res.store).create_job([image], [prompt], {"filters": "none", **params})
    (item,) = items_of(res.store, manifest.job_id)
    spec = SegmentSpec.model_validate(manifest.spec)
    engine = res.engine(spec.options)
    return item, engine.request, process_item(res.store, engine, spec, item)


def test_worker_loads_the_recommendation_once_and_reports_it(resources):
    assert dict(resources.sam.generator) == RECOMMENDED
    assert resources.health()["recommended_generator"] == RECOMMENDED
    options = SegmentOptions(points_per_side=3)
    generator = resources.engine(options).generator.params()
    assert generator["points_per_side"] == 3 and generator["pred_iou_thresh"] == 0.0  # explicit, then the file
    assert generator["crop_n_layers"] == 0  # SAM's default
    assert generator["points_per_batch"] == resources.settings.models.points_per_batch  # the worker's, not the request's
    assert resources.engine(options, points_per_batch=8).generator.params()["points_per_batch"] == 8


def test_worker_merges_and_keys_proposals_by_resolved_options(resources, tmp_path):
    image = make_images(tmp_path / "images", 1, seed=40)[0]
    item, request, outcome = segment(resources, image, "a red box")
    assert outcome.state == "done" and outcome.how == "computed"
    doc = resources.store.get_json(f"{outcome.result_key}/segments.json")
    assert len(doc["segments"]) > 0, "the recommended options must produce segments, or this test checks nothing"
    assert {k: doc["request"]["generator"][k] for k in RECOMMENDED} == RECOMMENDED  # the resolved options
    cached = resources.store.get_json(proposals_key(item.image_sha, request))
    assert cached["identity"]["generator"]["points_per_side"] == 2

    # the same effective options asked for explicitly: the cached proposals are reused
    _, same_request, same = segment(resources, image, "a blue disc", points_per_side=2, pred_iou_thresh=0.0)
    assert same.state == "done" and same.how == "cached"
    assert same_request.proposal_digest() == request.proposal_digest()
    # other effective options: never served from that cache
    _, other_request, other = segment(resources, image, "a red box", points_per_side=3)
    assert other.state == "done" and other.how == "computed"
    assert other.result_key != outcome.result_key and other_request.proposal_digest() != request.proposal_digest()


def test_queue_evaluation_with_the_warm_sam_merges_its_recommendation(resources, tmp_path):
    from dataclasses import replace

    from slip.data.synth import generate_dataset
    from jobs.training import EvaluateRequest, upload_directory
    from worker.train_tasks import run_evaluate

    dataset = generate_dataset(tmp_path / "ds", classes=4, per_class=5, size=32, seed=0)
    request = EvaluateRequest(job_id="gen-defaults", ranker_index=0, ranker="tiny-random", chunk=0, start=0, stop=1,
                              dataset=upload_directory(resources.store, dataset), tile_size=32, proposals="sam")

    def chosen(res) -> list:
        doc = res.store.get_json(run_evaluate(res, request)["key"])
        return [r["chosen"] for r in doc["results"]]

    with_recommendation = chosen(resources)
    assert with_recommendation and any(c is not None for c in with_recommendation)
    # control: the same grid under SAM's default thresholds leaves nothing to choose from
    defaults = replace(resources, sam=replace(resources.sam, generator={"points_per_side": 2}))
    assert all(c is None for c in chosen(defaults))
