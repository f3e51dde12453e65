"""MaskGenerator returns exactly what segment_anything's SamAutomaticMaskGenerator returns.

Two models are used, both on CPU at ``img_size`` 128:

* ``tiny_sam`` — the real SAM architecture with random weights (``build_tiny_sam``). Its masks are
  near-identical full-image noise, so with NMS on they collapse to one or two; the NMS-off case is the
  exhaustive comparison of every candidate.
* ``disc_sam`` — the same image encoder with a deterministic stand-in for SAM's prompt encoder and mask
  decoder: each point prompt yields three discs of growing radius around it, plus islands and holes
  taken from the image embedding. Masks then differ across the grid, so every stage (IoU and
  stability filters, in-crop NMS, crop NMS, crop-edge filter, small-region removal) has real work.

Records are compared field by field, in order: masks, areas, boxes, crop boxes exactly; scores and
points with ``allclose`` (they come out bit-identical in practice).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator
from torch import nn

from slip.errors import ConfigError, DeviceOutOfMemoryError, ImageError
from slip.generator import MaskGenerator
from slip.sam import build_tiny_sam

NO_FILTERS = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0)
LOOSE = dict(pred_iou_thresh=0.8, stability_score_thresh=0.8)


def make_scene(height: int = 96, width: int = 128) -> np.ndarray:
    """``(H, W, 3) uint8``: a red rectangle, a green disc and a blue rectangle on grey."""
    image = np.full((height, width, 3), 40, np.uint8)
    image[10:50, 15:60] = (220, 30, 30)
    yy, xx = np.mgrid[:height, :width]
    image[(yy - 60) ** 2 + (xx - 90) ** 2 < 20**2] = (30, 200, 40)
    image[70:90, 10:40] = (30, 30, 230)
    return image


class PointPromptEncoder(nn.Module):
    """Passes the (resized-frame) point coordinates through as the sparse embedding."""

    def forward(self, points, boxes, masks):
        coords, _ = points
        return coords.float(), torch.zeros(len(coords), 0)

    def get_dense_pe(self) -> torch.Tensor:
        return torch.zeros(1)


class DiscDecoder(nn.Module):
    """Three disc masks per point (radii in input pixels), with islands where the image embedding's
    first channel is highest and holes where it is lowest; predicted IoU varies with the point."""

    radii = (6.0, 14.0, 30.0)

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                multimask_output):
        side = image_embeddings.shape[-1] * 4  # low-res mask side
        centres = (torch.arange(side, dtype=torch.float32) + 0.5) * (128 / side)
        p = sparse_prompt_embeddings[:, 0]  # (B, 2) XY in the 128-pixel input frame
        dx = centres[None, None, :] - p[:, 0, None, None]
        dy = centres[None, :, None] - p[:, 1, None, None]
        dist = (dx**2 + dy**2).sqrt()
        logits = 2.0 * (torch.tensor(self.radii)[None, :, None, None] - dist[:, None])
        e = image_embeddings[0, 0]
        order = e.flatten().sort().values

        def cells(m: torch.Tensor) -> torch.Tensor:
            return F.interpolate(m[None, None].float(), size=(side, side), mode="nearest")[0, 0] > 0

        logits = torch.where(cells(e >= order[-3]), logits.clamp(min=4.0), logits)  # islands
        logits = torch.where(cells(e <= order[2]), logits.clamp(max=-4.0), logits)  # holes
        iou = 0.8 + 0.2 * torch.sin(0.37 * p[:, :1] + 0.23 * p[:, 1:] + torch.arange(3.0))
        return logits, iou


class OutOfMemoryDecoder(nn.Module):
    def forward(self, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these tiny models gain nothing from more, and on a loaded 2-core machine
    thread contention makes the official generator's runs take seconds instead of ~1 s."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return make_scene()


@pytest.fixture(scope="module")
def tiny_sam():
    return build_tiny_sam()


@pytest.fixture(scope="module")
def disc_sam():
    sam = build_tiny_sam()
    sam.prompt_encoder = PointPromptEncoder()
    sam.mask_decoder = DiscDecoder()
    return sam


def both(sam, image: np.ndarray, **options) -> tuple[list[dict], list[dict]]:
    """(ours, official) records for the same model, image and options."""
    return MaskGenerator(sam, **options).generate(image), SamAutomaticMaskGenerator(sam, **options).generate(image)


def assert_same_records(ours: list[dict], official: list[dict]) -> None:
    assert len(ours) == len(official)
    for i, (a, b) in enumerate(zip(ours, official)):
        assert a.keys() == b.keys(), i
        if isinstance(b["segmentation"], np.ndarray):
            assert a["segmentation"].dtype == np.bool_ and np.array_equal(a["segmentation"], b["segmentation"]), i
        else:
            assert a["segmentation"] == b["segmentation"], i
        for key in ("area", "bbox", "crop_box"):
            assert a[key] == b[key], (i, key, a[key], b[key])
        assert np.allclose(a["point_coords"], b["point_coords"], rtol=0, atol=1e-9), i
        for key in ("predicted_iou", "stability_score"):
            assert np.isclose(a[key], b[key], rtol=0, atol=1e-6, equal_nan=True), (i, key, a[key], b[key])


# --- equality with the official generator ---------------------------------------------------------------


def test_every_candidate_matches_with_nms_off(tiny_sam, image):
    # 64 points in 3 batches (the last one partial): every candidate mask survives and is compared
    options = dict(points_per_side=8, points_per_batch=30, box_nms_thresh=1.0, **NO_FILTERS)
    ours, official = both(tiny_sam, image, **options)
    assert len(official) == 3 * 64
    assert_same_records(ours, official)


def test_default_options_match_random_sam(tiny_sam, image):
    ours, official = both(tiny_sam, image)
    assert_same_records(ours, official)  # random weights: the default thresholds may keep nothing


def test_score_filters_and_nms_match_random_sam(tiny_sam, image):
    ours, official = both(tiny_sam, image, points_per_side=16, **NO_FILTERS)
    assert len(official) >= 1
    assert_same_records(ours, official)


def test_default_options_match(disc_sam, image):
    ours, official = both(disc_sam, image)
    assert len(official) >= 5
    assert_same_records(ours, official)


@pytest.mark.parametrize(
    "options", [LOOSE, dict(pred_iou_thresh=0.9), dict(stability_score_thresh=0.9, stability_score_offset=2.0)]
)
def test_score_thresholds_match(disc_sam, image, options):
    ours, official = both(disc_sam, image, **options)
    assert len(official) >= 5
    assert_same_records(ours, official)


def test_crop_layers_match(disc_sam, image):
    options = dict(points_per_side=16, crop_n_layers=1, crop_n_points_downscale_factor=2, **LOOSE)
    ours, official = both(disc_sam, image, **options)
    full = [0, 0, image.shape[1], image.shape[0]]
    assert any(r["crop_box"] != full for r in official), "no mask came from a crop: the case is vacuous"
    assert_same_records(ours, official)


def test_crop_layers_match_random_sam(tiny_sam, image):
    options = dict(crop_n_layers=1, points_per_side=8, box_nms_thresh=1.0, crop_nms_thresh=1.0, **NO_FILTERS)
    ours, official = both(tiny_sam, image, **options)
    assert len(official) > 10
    assert_same_records(ours, official)


def test_small_region_removal_matches(disc_sam, image):
    ours, official = both(disc_sam, image, min_mask_region_area=300, **LOOSE)
    plain = MaskGenerator(disc_sam, **LOOSE).generate(image)
    changed = {r["area"] for r in official} != {r["area"] for r in plain}
    assert changed, "min_mask_region_area changed no mask: the case is vacuous"
    assert_same_records(ours, official)


def test_explicit_point_grids_match(disc_sam, image):
    grid = np.random.default_rng(0).uniform(0.05, 0.95, size=(70, 2))
    ours, official = both(disc_sam, image, points_per_side=None, point_grids=[grid], **LOOSE)
    assert len(official) >= 3
    assert_same_records(ours, official)


@pytest.mark.parametrize("output_mode", ["binary_mask", "uncompressed_rle", "coco_rle"])
def test_output_modes_match(disc_sam, image, output_mode):
    ours, official = both(disc_sam, image, points_per_side=16, output_mode=output_mode, **LOOSE)
    assert len(official) >= 5
    assert_same_records(ours, official)
    if output_mode == "coco_rle":  # and the RLEs decode to the binary masks
        binary = MaskGenerator(disc_sam, points_per_side=16, **LOOSE).generate(image)
        for rle, record in zip(ours, binary):
            assert np.array_equal(mask_utils.decode(rle["segmentation"]).astype(bool), record["segmentation"])


# --- the tensor fast path ---------------------------------------------------------------------------------


def test_generate_masks_agrees_with_generate(disc_sam, image):
    generator = MaskGenerator(disc_sam, points_per_side=16, crop_n_layers=1, **LOOSE)
    records = generator.generate(image)
    found = generator.generate_masks(image)
    assert len(found) == len(records) >= 5
    assert found.masks.dtype == torch.bool and found.masks.shape == (len(records), *image.shape[:2])
    assert found.masks.device == disc_sam.device
    assert np.array_equal(found.masks.numpy(), np.stack([r["segmentation"] for r in records]))
    assert found.areas.tolist() == [r["area"] for r in records]
    xywh = torch.cat([found.boxes[:, :2], found.boxes[:, 2:] - found.boxes[:, :2]], 1)
    assert xywh.tolist() == [r["bbox"] for r in records]
    assert found.crop_boxes.tolist() == [r["crop_box"] for r in records]
    assert np.allclose(found.predicted_iou.numpy(), [r["predicted_iou"] for r in records])
    assert np.allclose(found.stability_score.numpy(), [r["stability_score"] for r in records])
    assert np.allclose(found.point_coords.numpy(), [r["point_coords"][0] for r in records], atol=1e-4)


def test_timings_cover_every_stage(disc_sam, image):
    timings: dict[str, float] = {}
    MaskGenerator(disc_sam, min_mask_region_area=300, **LOOSE).generate_masks(image, timings=timings)
    assert set(timings) == {"encode", "decode", "postprocess", "small_regions"}
    assert all(seconds >= 0 for seconds in timings.values())


def test_points_per_batch_does_not_change_the_result(disc_sam, image):
    generator = MaskGenerator(disc_sam, points_per_side=16, **LOOSE)
    small = generator.replace(points_per_batch=7)
    assert small.params()["points_per_batch"] == 7 and small.params()["pred_iou_thresh"] == 0.8
    a, b = generator.generate_masks(image), small.generate_masks(image)
    assert len(a) >= 5 and torch.equal(a.masks, b.masks) and torch.equal(a.boxes, b.boxes)


def test_params_are_json_and_rebuild_the_generator(disc_sam):
    grid = np.array([[0.25, 0.5], [0.75, 0.5]])
    generator = MaskGenerator(disc_sam, points_per_side=None, point_grids=[grid], output_mode="coco_rle")
    params = json.loads(json.dumps(generator.params()))
    assert params["point_grids"] == [grid.tolist()] and params["output_mode"] == "coco_rle"
    assert MaskGenerator(disc_sam, **params).params() == generator.params()


def test_half_precision_model_runs(image):
    sam = build_tiny_sam().to(torch.bfloat16)  # the official generator fails on half models
    found = MaskGenerator(sam, points_per_side=8, **NO_FILTERS).generate_masks(image)
    assert len(found) >= 1 and found.masks.dtype == torch.bool and found.predicted_iou.dtype == torch.float32


def test_out_of_memory_is_a_retryable_error(image):
    sam = build_tiny_sam()
    sam.mask_decoder = OutOfMemoryDecoder()
    with pytest.raises(DeviceOutOfMemoryError, match="points_per_batch=64") as info:
        MaskGenerator(sam).generate_masks(image)
    assert isinstance(info.value.__cause__, torch.cuda.OutOfMemoryError)


# --- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((32, 32), np.uint8), "RGB"),
        (np.zeros((32, 32, 4), np.uint8), "RGB"),
        (np.zeros((32, 32, 3), np.float32), "uint8"),
        (np.zeros((0, 32, 3), np.uint8), "empty"),
        ([[0, 0, 0]], "numpy"),
    ],
)
def test_bad_images_raise_image_error(tiny_sam, bad, match):
    generator = MaskGenerator(tiny_sam, points_per_side=4)
    with pytest.raises(ImageError, match=match):
        generator.generate(bad)
    with pytest.raises(ImageError, match=match):
        generator.generate_masks(bad)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(output_mode="png"), "output_mode"),
        (dict(points_per_side=0), "points_per_side"),
        (dict(points_per_side=None), "exactly one"),
        (dict(point_grids=[np.full((4, 2), 0.5)]), "exactly one"),
        (dict(points_per_side=None, point_grids=[np.full((4, 3), 0.5)]), r"\(P, 2\)"),
        (dict(points_per_side=None, point_grids=[np.full((4, 2), 0.5)], crop_n_layers=1), "needs 2"),
        (dict(points_per_side=4, crop_n_layers=3, crop_n_points_downscale_factor=2), ">= 1"),
        (dict(pred_iou_thresh=1.5), "pred_iou_thresh"),
        (dict(box_nms_thresh=-0.1), "box_nms_thresh"),
        (dict(points_per_batch=0), "points_per_batch"),
        (dict(crop_n_layers=-1), "crop_n_layers"),
        (dict(min_mask_region_area=2.5), "min_mask_region_area"),
        (dict(stability_score_offset=float("nan")), "stability_score_offset"),
    ],
)
def test_bad_options_raise_config_error(tiny_sam, options, match):
    with pytest.raises(ConfigError, match=match):
        MaskGenerator(tiny_sam, **options)
