"""SegmentParams' SAM options default to the worker SAM's recommendation (its generator.json), and the
proposals cache is keyed by the resolved options. The worker part runs in-process on real resources:
a tiny-random SAM saved as a checkpoint with a generator.json beside it, a real directory store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slip.errors import ConfigError
from slip.sam import GENERATOR_FILE, SAM_ARCHS, TINY_SPEC, build_tiny_sam, save_sam
from worker.jobs import GENERATOR_FIELDS, SegmentParams, SegmentSpec, parse_model
from worker.processing import process_item
from worker.proposals import proposals_key
from worker.resources import load_resources
from worker.settings import Settings

from queue_helpers import make_images, queue_env

DB = 10  # never touched: process_item runs without Redis, but the settings need a broker URL
# a 2x2 point grid with no score thresholds: the tiny-random SAM returns masks, fast
RECOMMENDED = {"points_per_side": 2, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 1.0}


# --- SegmentParams --------------------------------------------------------------------------------------


def test_sam_options_default_to_none_and_only_given_ones_are_kwargs():
    params = SegmentParams()
    assert all(getattr(params, name) is None for name in GENERATOR_FIELDS)
    assert params.generator_kwargs() == {}
    assert SegmentParams(points_per_side=8, box_nms_thresh=0.5).generator_kwargs() == {"points_per_side": 8,
                                                                                       "box_nms_thresh": 0.5}


@pytest.mark.parametrize("bad", [{"points_per_side": 0}, {"points_per_side": 257}, {"pred_iou_thresh": 1.5},
                                 {"stability_score_thresh": -0.1}, {"box_nms_thresh": 2.0}])
def test_given_sam_options_keep_their_bounds(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        parse_model(SegmentParams, bad)


def test_generator_options_precedence():
    recommended = {"points_per_side": 16, "pred_iou_thresh": 0.3, "stability_score_offset": 0.25,
                   "points_per_batch": 8}
    options = SegmentParams(pred_iou_thresh=0.5).generator_options(recommended)
    assert options["points_per_side"] == 16 and options["stability_score_offset"] == 0.25  # recommended
    assert options["pred_iou_thresh"] == 0.5  # given
    assert options["stability_score_thresh"] == 0.95 and options["box_nms_thresh"] == 0.7  # SAM's defaults
    assert "points_per_batch" not in options  # the worker's, not an output-changing option


def test_proposal_identity_uses_resolved_options():
    def identity(params: SegmentParams, recommended: dict) -> dict:
        return params.proposal_identity("synth", params.generator_options(recommended), params.filter_chain(None))

    synth = {"points_per_side": 16, "pred_iou_thresh": 0.3}
    # the same effective options share an identity, however they were reached
    assert identity(SegmentParams(), synth) == identity(SegmentParams(points_per_side=16, pred_iou_thresh=0.3), synth)
    assert identity(SegmentParams(), {}) == identity(SegmentParams(points_per_side=32), {})
    # different effective options never do
    assert identity(SegmentParams(), synth) != identity(SegmentParams(), {})
    assert identity(SegmentParams(points_per_side=8), synth) != identity(SegmentParams(), synth)
    assert identity(SegmentParams(filters="none"), synth) != identity(SegmentParams(), synth)


# --- the worker ---------------------------------------------------------------------------------------


@pytest.fixture()
def resources(tmp_path):
    checkpoint = tmp_path / "tiny-sam"
    save_sam(build_tiny_sam(), checkpoint / "sam.pth", SAM_ARCHS[TINY_SPEC])
    (checkpoint / GENERATOR_FILE).write_text(json.dumps(RECOMMENDED))
    env = queue_env(tmp_path / "store", db=DB, SLIP_SAM=str(checkpoint), SLIP_CACHE=str(tmp_path / "cache"))
    settings = Settings.from_env(env)
    res = load_resources(settings, load_models=True)
    yield res
    res.close()


def segment(res, image: Path, prompt: str, **params):
    from producer.client import QueueClient

    manifest = QueueClient(res.settings, store=res.store).create_job([image], [prompt], {"filters": "none", **params})
    item = manifest.items[0]
    return manifest.spec, item, process_item(res, manifest.spec, item, points_per_batch=None)


def test_worker_loads_the_recommendation_once_and_reports_it(resources):
    assert resources.recommended_generator == RECOMMENDED
    assert resources.health()["recommended_generator"] == RECOMMENDED
    pipeline = resources.pipeline(SegmentParams(points_per_side=3))
    generator = pipeline.generator.params()
    assert generator["points_per_side"] == 3 and generator["pred_iou_thresh"] == 0.0
    assert generator["points_per_batch"] == resources.settings.points_per_batch


def test_worker_merges_and_keys_proposals_by_resolved_options(resources, tmp_path):
    image = make_images(tmp_path / "images", 1, seed=40)[0]
    spec, item, record = segment(resources, image, "a red box")
    assert record.status == "done" and record.proposals == "computed" and record.segments > 0
    doc = resources.store.get_json(f"{record.result_key}/segments.json")
    assert {k: doc["params"][k] for k in RECOMMENDED} == RECOMMENDED  # the resolved options are reported
    assert doc["params"]["pipeline"]["generator"]["points_per_side"] == 2
    cached = resources.store.get_json(proposals_key(spec, item, resources.generator_options(spec.params),
                                                    resources.filter_chain(spec.params)))
    assert cached["identity"]["generator"]["points_per_side"] == 2

    # the same effective options asked for explicitly: the cached proposals are reused
    _, _, same = segment(resources, image, "a blue disc", points_per_side=2, pred_iou_thresh=0.0)
    assert same.status == "done" and same.proposals == "cached" and same.segments == record.segments
    # other effective options: never served from that cache
    _, _, other = segment(resources, image, "a red box", points_per_side=3)
    assert other.status == "done" and other.proposals == "computed"
    assert other.result_key != record.result_key


def test_queue_evaluation_with_the_warm_sam_merges_its_recommendation(resources, tmp_path):
    from dataclasses import replace

    from slip.data.synth import generate_dataset
    from worker.train_tasks import EvaluateRequest, run_evaluate, upload_directory

    dataset = generate_dataset(tmp_path / "ds", classes=4, per_class=5, size=32, seed=0)
    request = EvaluateRequest(job_id="gen-defaults", ranker_index=0, ranker="tiny-random", chunk=0, start=0, stop=1,
                              dataset=upload_directory(resources.store, dataset), tile_size=32, proposals="sam")

    def chosen(res) -> list:
        doc = res.store.get_json(run_evaluate(res, request)["key"])
        return [r["chosen"] for r in doc["results"]]

    with_recommendation = chosen(resources)
    assert with_recommendation and any(c is not None for c in with_recommendation)
    # control: the same grid under SAM's default thresholds leaves nothing to choose from
    assert all(c is None for c in chosen(replace(resources, recommended_generator={"points_per_side": 2})))
