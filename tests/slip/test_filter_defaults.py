"""A recommended annotation filter chain beside a SAM checkpoint (``filters.json``) and its precedence:
the paper's ``containment`` < the checkpoint's filters.json < the chain the user gives explicitly.

The precedence itself is written once, in :func:`slip.request.resolve` (golden tests in test_request.py);
here: reading and checking the file, the SAM bundle carrying it, and every place a pipeline is built."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from producer.cli import build_app
from slip.config import SlipConfig, build_slip
from slip.errors import ConfigError
from slip.evaluate import sam_proposer
from slip.rankers.loading import load_ranker_bundle
from slip.request import PAPER_FILTERS, SegmentOptions, canonical_filters, resolve
from slip.sam import (
    BUNDLED_DIR,
    FILTERS_FILE,
    GENERATOR_FILE,
    SAM_ARCHS,
    TINY_SPEC,
    build_tiny_sam,
    load_sam_bundle,
    recommended_filters,
    save_sam,
)

# options that make the tiny-random SAM return 12 masks on IMAGE (a 2x2 grid, no thresholds, no NMS);
# of them the paper's containment keeps 2, containment without dropping the largest keeps 3
TINY_GENERATOR = {"points_per_side": 2, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 1.0}
KEEP_LARGEST = "containment:drop_largest=false"


@pytest.fixture()
def checkpoint(tmp_path: Path) -> Path:
    """The tiny-random SAM saved as a checkpoint directory with a generator.json and a filters.json."""
    folder = tmp_path / "tiny-sam"
    save_sam(build_tiny_sam(), folder / "sam.pth", SAM_ARCHS[TINY_SPEC])
    (folder / GENERATOR_FILE).write_text(json.dumps(TINY_GENERATOR))
    (folder / FILTERS_FILE).write_text(json.dumps({"filters": KEEP_LARGEST, "why": "test"}))
    return folder


@pytest.fixture()
def image() -> np.ndarray:
    rng = np.random.default_rng(3)
    array = rng.integers(0, 255, size=(64, 64, 3), dtype=np.uint8)
    array[16:40, 20:44] = (255, 0, 0)
    return array


def drop_largest(chain) -> list[bool]:
    """``drop_largest`` of each containment filter in a built chain."""
    return [f.params()["drop_largest"] for f in chain if f.name == "containment"]


# --- reading and checking the file ------------------------------------------------------------------------


def test_synth_recommends_keeping_the_largest_segment():
    from slip.train.sam import SYNTH_SAM_FILTERS

    assert recommended_filters("synth") == "containment:drop_largest=false"
    bundled = json.loads((BUNDLED_DIR / "synth-sam" / FILTERS_FILE).read_text())
    assert bundled == SYNTH_SAM_FILTERS and "background" in bundled["why"]


def test_tiny_random_and_checkpoints_without_a_file_recommend_nothing(checkpoint):
    assert recommended_filters(TINY_SPEC) is None
    assert recommended_filters(str(checkpoint)) == KEEP_LARGEST
    assert recommended_filters(str(checkpoint / "sam.pth")) == KEEP_LARGEST  # a file: read beside it
    (checkpoint / FILTERS_FILE).unlink()
    assert recommended_filters(str(checkpoint)) is None


@pytest.mark.parametrize("content", [
    {"filters": "containment:0.8,nonsense"},  # unknown filter
    {"filters": "containment:drop_largest=maybe"},  # bad value
    {"filters": ""},  # empty chain
    {"filters": ["containment"]},  # not a string
    {"why": "no chain"},  # no chain at all
    {"filters": "containment", "filter": "none"},  # a misspelt key
    ["containment"],  # not an object
])
def test_a_bad_file_is_a_config_error_naming_it(checkpoint, content):
    (checkpoint / FILTERS_FILE).write_text(json.dumps(content))
    with pytest.raises(ConfigError) as info:
        recommended_filters(str(checkpoint))
    assert str(checkpoint / FILTERS_FILE) in str(info.value)


def test_a_file_that_is_not_json_is_a_config_error_naming_it(checkpoint):
    (checkpoint / FILTERS_FILE).write_text("{containment")
    with pytest.raises(ConfigError, match=FILTERS_FILE):
        recommended_filters(str(checkpoint))


def test_the_sam_bundle_carries_the_checked_chain_and_resolve_applies_it(checkpoint, tmp_path):
    bundle = load_sam_bundle(str(checkpoint), device="cpu", cache_dir=tmp_path / "cache")
    assert bundle.filters == KEEP_LARGEST
    assert load_sam_bundle(TINY_SPEC, device="cpu").filters is None
    ranker = load_ranker_bundle("tiny-random", device="cpu")

    def chain(given: str | None, sam=bundle) -> tuple:
        return resolve(SegmentOptions(filters=given), sam=sam.ref, sam_generator=sam.generator, sam_filters=sam.filters,
                       ranker=ranker.ref, ranker_threshold=ranker.threshold).filters

    assert PAPER_FILTERS == "containment"
    assert chain(None) == canonical_filters(KEEP_LARGEST)  # the file
    assert chain("none") == ()  # explicit wins
    assert chain("containment") == canonical_filters("containment")
    (checkpoint / FILTERS_FILE).unlink()
    assert chain(None, load_sam_bundle(str(checkpoint), device="cpu", cache_dir=tmp_path / "cache")) == \
        canonical_filters(PAPER_FILTERS)  # no file: the paper's
    (checkpoint / FILTERS_FILE).write_text(json.dumps({"filters": "containment:keep=sideways", "why": "bad"}))
    with pytest.raises(ConfigError, match=FILTERS_FILE):
        load_sam_bundle(str(checkpoint), device="cpu", cache_dir=tmp_path / "cache")  # checked at load, never served


def test_install_bundle_writes_the_recommendation(tmp_path):
    from slip.train.sam import SYNTH_SAM_FILTERS, install_bundle

    work = tmp_path / "work"
    save_sam(build_tiny_sam(), work / "sam.pth", SAM_ARCHS[TINY_SPEC])
    (work / "training.json").write_text(json.dumps({"best_epoch": 1}))
    target = install_bundle(work, tmp_path / "synth-sam")
    assert json.loads((target / FILTERS_FILE).read_text()) == SYNTH_SAM_FILTERS
    assert recommended_filters(str(target)) == SYNTH_SAM_FILTERS["filters"]


# --- precedence where pipelines are built ------------------------------------------------------------------


def test_build_slip_uses_the_recommendation_unless_a_chain_is_given():
    def chain(**options) -> tuple:
        return build_slip(SlipConfig.of(clip="tiny-random", device="cpu", **options)).filters

    assert drop_largest(chain(sam="synth")) == [False]  # synth-sam's filters.json
    assert chain(sam="synth", filters="none") == ()  # explicit wins
    assert drop_largest(chain(sam="synth", filters="containment")) == [True]
    assert drop_largest(chain(sam="tiny-random")) == [True]  # no recommendation: the paper's default


def test_sam_proposer_with_a_spec_uses_the_checkpoint_chain(checkpoint, image):
    assert len(sam_proposer(str(checkpoint), device="cpu")(image)) == 3  # filters.json: keep the largest
    assert len(sam_proposer(str(checkpoint), device="cpu", filters="containment")(image)) == 2
    assert len(sam_proposer(str(checkpoint), device="cpu", filters="none")(image)) == 12


def test_sam_proposer_with_a_loaded_bundle_uses_its_recommendation(image):
    from dataclasses import replace

    tiny = load_sam_bundle(TINY_SPEC, device="cpu")  # a warm SAM, as a worker holds it
    bundle = replace(tiny, generator=TINY_GENERATOR)
    assert len(sam_proposer(bundle)(image)) == 2  # no chain recommended: the paper's
    assert len(sam_proposer(replace(bundle, filters=KEEP_LARGEST))(image)) == 3
    assert len(sam_proposer(replace(bundle, filters=KEEP_LARGEST), filters="none")(image)) == 12


def test_cli_segment_records_the_resolved_chain(checkpoint, image, tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(image).save(path)

    def segments_of(*extra: str) -> dict:
        out = tmp_path / f"out{len(extra)}"
        result = CliRunner().invoke(build_app(), ["segment", str(path), "--prompt", "red box", "--out", str(out),
                                          "--sam", str(checkpoint), "--clip", "tiny-random", "--device", "cpu",
                                          *extra])
        assert result.exit_code == 0, result.output
        return json.loads((out / "img" / "segments.json").read_text())

    recommended = segments_of()
    assert [(f["name"], f["drop_largest"]) for f in recommended["request"]["filters"]] == [("containment", False)]
    assert [f["params"]["drop_largest"] for f in recommended["filters"]] == [False]  # the chain that ran
    assert len(recommended["segments"]) == 3
    explicit = segments_of("--filters", "containment")
    assert [(f["name"], f["drop_largest"]) for f in explicit["request"]["filters"]] == [("containment", True)]
    assert len(explicit["segments"]) == 2
    assert explicit["request_digest"] != recommended["request_digest"], "another chain, another result key"


def test_cli_evaluate_local_takes_filters(checkpoint, tmp_path):
    from slip.data.synth import generate_dataset

    dataset = generate_dataset(tmp_path / "ds", classes=4, per_class=5, size=32, seed=0)
    (checkpoint / FILTERS_FILE).write_text(json.dumps({"filters": "min_area:100000", "why": "drops everything"}))

    def chosen_kinds(*extra: str) -> dict:
        out = tmp_path / f"eval{len(extra)}.json"
        result = CliRunner().invoke(build_app(), ["evaluate-local", str(dataset), "--ranker", "tiny-random", "--composites",
                                          "1", "--tile-size", "32", "--proposals", "sam", "--sam", str(checkpoint),
                                          "--device", "cpu", "--quiet", "--json", str(out), *extra])
        assert result.exit_code == 0, result.output
        (run,) = json.loads(out.read_text())
        return run["summary"]["plain"]["chosen_kinds"]

    assert chosen_kinds() == {"None": 4}  # the checkpoint's chain left no proposal to choose
    assert chosen_kinds("--filters", "none") == {"proposal": 4}  # the explicit chain wins
