"""SAM 3 as an engine (``sam3``) and as a proposer for a ranker (``sam3-rank``), on the tiny-random model of the
real classes: loading by path, presence-scaled scores, thresholds and instances as for any engine, the vision
features computed once per image, and one-line refusals before any work."""

from __future__ import annotations

import json

import pytest
import torch

from engine_helpers import scene
from slip.engines.build import build_engine
from slip.engines.sam3 import Sam3Concepts, Sam3Vision, instances
from slip.engines.sam3_model import build_tiny_sam3, load_sam3, save_sam3
from slip.errors import ConfigError, WeightsNotFoundError
from slip.options import SegmentOptions
from slip.outputs import render_outputs
from slip.settings import ModelSettings
from slip.timing import StageTimer

PROMPTS = ["a red disc", "a box"]


@pytest.fixture(scope="module")
def image():
    return scene()


@pytest.fixture(scope="module")
def concepts():
    return Sam3Concepts(load_sam3("tiny-random-sam3", device="cpu"))


def engine(options: dict | None = None):
    settings = ModelSettings(engine="sam3", sam="tiny-random-sam3", device="cpu")
    return build_engine(settings, SegmentOptions.parse(options or {}))


def test_a_saved_directory_loads_by_path_and_answers_alike(tmp_path, image, concepts):
    directory = save_sam3(*build_tiny_sam3(), tmp_path / "sam3")
    loaded = load_sam3(str(directory), device="cpu")
    assert loaded.ref.arch == "sam3" and len(loaded.ref.sha256) == 64
    a = concepts.concepts(concepts.vision(image), PROMPTS)
    b = Sam3Concepts(loaded).concepts(Sam3Concepts(loaded).vision(image), PROMPTS)
    for x, y in zip(a, b):
        assert torch.equal(x.scores, y.scores) and x.presence == y.presence


def test_scores_carry_the_presence_factor_and_instances_are_full_resolution(image, concepts):
    vision = concepts.vision(image)
    (concept,) = concepts.concepts(vision, ["a red disc"])
    assert 0.0 < concept.presence < 1.0
    assert float(concept.scores.max()) <= concept.presence + 1e-6  # sigmoid(logit) * presence
    found = instances(concept, vision.image_size)
    assert found.masks.shape[1:] == image.shape[:2] and len(found) >= 1
    assert torch.all(found.predicted_iou[:-1] >= found.predicted_iou[1:])  # best first
    assert torch.allclose(found.stability_score, torch.tensor(concept.presence))


def test_a_new_prompt_reuses_the_vision_features(image, concepts):
    concepts = Sam3Concepts(concepts.bundle)  # an empty cache
    timer = StageTimer()
    vision = concepts.vision(image, timer)
    assert "encode" in timer.seconds
    again = StageTimer()
    assert concepts.vision(image.copy(), again) is vision and "encode" not in again.seconds
    cold = Sam3Concepts(concepts.bundle)  # no cache: the same answers
    (warm,) = concepts.concepts(vision, ["a tree"])
    (fresh,) = cold.concepts(cold.vision(image), ["a tree"])
    assert torch.equal(warm.scores, fresh.scores)


def test_vision_features_round_trip_through_bytes(image, concepts):
    vision = concepts.vision(image)
    back = Sam3Vision.from_bytes(vision.to_bytes())
    assert back.image_size == vision.image_size
    (a,), (b,) = concepts.concepts(vision, ["x"]), concepts.concepts(back, ["x"])
    assert torch.equal(a.scores, b.scores)


def test_the_engine_answers_with_thresholds_and_instances_like_any_engine(image):
    low = engine({"threshold": 0.0, "instances": "all"})(image, PROMPTS)
    assert all(m.instances for m in low.matches)
    assert all(s >= 0.0 for m in low.matches for _, s in m.instances)
    high = engine({"threshold": 1.0})(image, PROMPTS)
    assert all(not m.instances and m.best is not None for m in high.matches)  # "not here", best still named
    default = engine()(image, PROMPTS)
    assert all(m.threshold == 0.5 for m in default.matches)  # SAM 3's own threshold when none is calibrated
    # each segment scores only for the prompt that found it
    assert ((low.similarity > 0).sum(1) <= 1).all()


def test_segments_json_records_the_engine_and_its_digest(image):
    first = engine()
    result = first(image, PROMPTS)
    doc = json.loads(render_outputs(image, result, PROMPTS, first.request, {}, render=False)["segments.json"])
    assert doc["request"]["engine"] == "sam3" and doc["request"]["sam"]["arch"] == "tiny-random-sam3"
    assert len(doc["segments"]) == len(result.proposals.segments)
    assert doc["request_digest"] == first.request.result_digest(PROMPTS)


def test_sam3_rank_proposes_the_concept_and_the_ranker_picks(image):
    settings = ModelSettings(engine="sam3-rank", sam="tiny-random-sam3", clip="tiny-random", device="cpu")
    animal = build_engine(settings, SegmentOptions.parse({"filters": "none", "propose": "animal"}))
    thing = build_engine(settings, SegmentOptions.parse({"filters": "none"}))
    result = animal(image, PROMPTS)
    assert len(result.proposals.segments) >= 1 and result.similarity.shape[1] == 2
    assert animal.request.to_json()["propose"] == "animal" and thing.request.to_json()["propose"] == "object"
    assert animal.request.proposal_digest() != thing.request.proposal_digest()


def test_the_slip_engine_keeps_its_digests():
    from dataclasses import replace

    settings = ModelSettings(engine="slip", sam="tiny-random", clip="tiny-random", device="cpu")
    request = build_engine(settings, SegmentOptions()).request
    assert request.engine == "slip" and request.engine_identity() == {}
    # the digests of a slip request are those of a request made before engines existed
    assert "engine" not in request.proposal_identity()
    assert replace(request, engine="sam3").proposal_digest() != request.proposal_digest()


@pytest.mark.parametrize("models, options, words", [
    (dict(engine="sam3", sam="vit_b"), {}, "needs a SAM 3 checkpoint"),
    (dict(engine="slip", sam="tiny-random-sam3"), {}, "--engine sam3"),
    (dict(engine="slip", sam="tiny-random"), {"propose": "animal"}, "--propose"),
    (dict(engine="sam3", sam="tiny-random-sam3"), {"points_per_side": 8}, "--points-per-side"),
    (dict(engine="sam3", sam="tiny-random-sam3"), {"filters": "containment"}, "--filters"),
    (dict(engine="sam3-rank", sam="tiny-random-sam3"), {"propose": " "}, "--propose is empty"),
])
def test_bad_combinations_are_one_line_before_any_load(models, options, words):
    settings = ModelSettings(**{"clip": "tiny-random", "device": "cpu", **models})
    with pytest.raises(ConfigError, match=words) as info:
        build_engine(settings, SegmentOptions.parse(options))
    assert "\n" not in str(info.value)


def test_an_unknown_engine_is_one_line():
    with pytest.raises(ConfigError, match="engine"):
        ModelSettings(engine="sam4")
    from slip.engines.build import check_engine

    with pytest.raises(ConfigError, match="unknown engine 'sam4'"):
        check_engine("sam4", SegmentOptions())


def test_missing_gated_sam3_says_where_to_accept_the_licence(tmp_path):
    with pytest.raises(WeightsNotFoundError) as info:
        load_sam3("facebook/sam3", device="cpu", cache_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "hf") in message
    assert "slip weights fetch facebook/sam3" in message and "HF_TOKEN" in message
    assert "https://huggingface.co/facebook/sam3" in message


def test_a_directory_of_another_model_is_not_taken_for_sam3(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "sam2"}))
    with pytest.raises(ConfigError, match="not a SAM 3 checkpoint"):
        load_sam3(str(tmp_path), device="cpu")
