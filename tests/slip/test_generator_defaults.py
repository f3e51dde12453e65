"""Recommended generator options beside a SAM checkpoint (``generator.json``) and their precedence:
SAM's defaults < the checkpoint's generator.json < options the user gives explicitly.

The precedence itself is written once, in :func:`slip.request.resolve` (golden tests in test_request.py);
here: reading and checking the file, the defaults being SAM's own, and every place a generator is built."""

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
from slip.request import GeneratorOptions
from slip.sam import (
    BUNDLED_DIR,
    GENERATOR_FILE,
    SAM_ARCHS,
    TINY_SPEC,
    build_tiny_sam,
    load_sam_bundle,
    read_generator_params,
    recommended_generator_params,
    save_sam,
)

# options that make the tiny-random SAM return masks: a 2x2 grid, no score thresholds, no NMS
TINY_RECOMMENDED = {"points_per_side": 2, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0,
                    "box_nms_thresh": 1.0}


@pytest.fixture()
def checkpoint(tmp_path: Path) -> Path:
    """The tiny-random SAM saved as a checkpoint directory, with TINY_RECOMMENDED beside it."""
    folder = tmp_path / "tiny-sam"
    save_sam(build_tiny_sam(), folder / "sam.pth", SAM_ARCHS[TINY_SPEC])
    (folder / GENERATOR_FILE).write_text(json.dumps(TINY_RECOMMENDED))
    return folder


@pytest.fixture()
def image() -> np.ndarray:
    rng = np.random.default_rng(3)
    array = rng.integers(0, 255, size=(64, 64, 3), dtype=np.uint8)
    array[16:40, 20:44] = (255, 0, 0)
    return array


def grid_xs(points_per_side: int, side: int = 64) -> set[float]:
    """X pixel coordinates of SAM's point grid on a ``side``-wide image."""
    return {round((i + 0.5) / points_per_side * side, 3) for i in range(points_per_side)}


def used_xs(masks) -> set[float]:
    return {round(float(x), 3) for x in masks.point_coords[:, 0]}


# --- reading and checking the file ------------------------------------------------------------------------


def test_synth_recommendation_is_the_bundled_file():
    bundled = json.loads((BUNDLED_DIR / "synth-sam" / GENERATOR_FILE).read_text())
    assert recommended_generator_params("synth") == bundled
    assert bundled["points_per_side"] == 16 and bundled["pred_iou_thresh"] == 0.3


def test_tiny_random_and_checkpoints_without_a_file_recommend_nothing(checkpoint):
    assert recommended_generator_params(TINY_SPEC) == {}
    (checkpoint / GENERATOR_FILE).unlink()
    assert recommended_generator_params(str(checkpoint)) == {}
    assert recommended_generator_params(str(checkpoint / "sam.pth")) == {}


def test_checkpoint_file_or_directory_reads_the_same_options(checkpoint):
    assert recommended_generator_params(str(checkpoint)) == TINY_RECOMMENDED
    assert recommended_generator_params(str(checkpoint / "sam.pth")) == TINY_RECOMMENDED


def test_unknown_option_is_a_config_error_naming_file_and_key(checkpoint):
    (checkpoint / GENERATOR_FILE).write_text(json.dumps({"points_per_side": 8, "points_per_sid": 4}))
    with pytest.raises(ConfigError) as info:
        recommended_generator_params(str(checkpoint))
    assert str(checkpoint / GENERATOR_FILE) in str(info.value) and "'points_per_sid'" in str(info.value)


@pytest.mark.parametrize("text", ["[16, 0.3]", "{not json"])
def test_a_file_that_is_not_a_json_object_is_a_config_error(checkpoint, text):
    (checkpoint / GENERATOR_FILE).write_text(text)
    with pytest.raises(ConfigError, match=GENERATOR_FILE):
        recommended_generator_params(str(checkpoint))


def test_train_module_still_exports_the_reader():
    from slip.train import sam as train_sam

    assert train_sam.read_generator_params is read_generator_params and train_sam.GENERATOR_FILE == GENERATOR_FILE


def test_generator_option_defaults_are_sams_own():
    """GeneratorOptions lists SAM's output-changing options with the defaults of segment_anything itself."""
    import inspect

    from segment_anything import SamAutomaticMaskGenerator

    signature = inspect.signature(SamAutomaticMaskGenerator.__init__).parameters
    defaults = GeneratorOptions().to_json()
    assert defaults == {name: signature[name].default for name in GeneratorOptions.names()}
    assert defaults["points_per_side"] == 32 and defaults["pred_iou_thresh"] == 0.88
    speed_only = {"self", "model", "points_per_batch", "point_grids", "output_mode"}
    assert set(signature) - speed_only == set(GeneratorOptions.names()), "every output-changing option is resolved"


def test_the_sam_bundle_carries_the_checked_options(checkpoint, tmp_path):
    assert load_sam_bundle(str(checkpoint), device="cpu", cache_dir=tmp_path / "cache").generator == TINY_RECOMMENDED
    assert load_sam_bundle(TINY_SPEC, device="cpu").generator == {}
    (checkpoint / GENERATOR_FILE).write_text(json.dumps({"points_per_side": 2.5}))
    with pytest.raises(ConfigError, match=GENERATOR_FILE):
        load_sam_bundle(str(checkpoint), device="cpu", cache_dir=tmp_path / "cache")  # checked at load, never served


# --- precedence where generators are built ----------------------------------------------------------------


def test_build_slip_merges_recommended_under_explicit_options():
    config = SlipConfig.of(sam="synth", clip="tiny-random", device="cpu", points_per_side=8)
    params = build_slip(config).generator.params()
    assert params["points_per_side"] == 8  # explicit wins
    assert params["pred_iou_thresh"] == 0.3 and params["stability_score_offset"] == 0.25  # generator.json
    assert params["crop_n_layers"] == 0  # SAM default


def test_build_slip_without_a_recommendation_keeps_sam_defaults():
    params = build_slip(SlipConfig.of(sam="tiny-random", clip="tiny-random", device="cpu")).generator.params()
    defaults = GeneratorOptions().to_json()
    assert {k: params[k] for k in defaults} == defaults


def test_sam_proposer_with_a_spec_uses_the_checkpoint_file(checkpoint, image):
    masks = sam_proposer(str(checkpoint), device="cpu", filters="none")(image)
    assert len(masks) > 0 and used_xs(masks) <= grid_xs(2)
    explicit = sam_proposer(str(checkpoint), device="cpu", filters="none", generator={"points_per_side": 3})(image)
    assert len(explicit) > 0 and used_xs(explicit) <= grid_xs(3)


def test_sam_proposer_with_a_loaded_bundle_merges_its_recommendation(image):
    from dataclasses import replace

    bundle = replace(load_sam_bundle(TINY_SPEC, device="cpu"), generator=TINY_RECOMMENDED)  # a warm SAM
    masks = sam_proposer(bundle, filters="none")(image)
    assert len(masks) > 0 and used_xs(masks) <= grid_xs(2)
    explicit = sam_proposer(bundle, filters="none", generator={"points_per_side": 3})(image)
    assert len(explicit) > 0 and used_xs(explicit) <= grid_xs(3)


def test_cli_segment_uses_the_recommendation_unless_overridden(checkpoint, image, tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(image).save(path)

    def generator_of(*extra: str) -> dict:
        out = tmp_path / f"out{len(extra)}"
        result = CliRunner().invoke(build_app(), ["segment", str(path), "--prompt", "red box", "--out", str(out),
                                          "--sam", str(checkpoint), "--clip", "tiny-random", "--device", "cpu",
                                          "--filters", "none", *extra])
        assert result.exit_code == 0, result.output
        return json.loads((out / "img" / "segments.json").read_text())["request"]["generator"]

    recommended = generator_of()
    assert {k: recommended[k] for k in TINY_RECOMMENDED} == TINY_RECOMMENDED
    assert recommended["crop_n_layers"] == 0  # SAM's default, recorded too
    overridden = generator_of("--points-per-side", "3")
    assert overridden["points_per_side"] == 3 and overridden["pred_iou_thresh"] == 0.0
