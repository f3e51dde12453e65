"""SAM 2's fast path against the official ``sam2`` package on the real architecture: the point decoder bit for bit,
the window upscaler bit for bit (at one thread and at two: PyTorch picks another kernel), and the whole generator's
records equal to ``SAM2AutomaticMaskGenerator``'s (thresholds 0, several crop layers, small-region filling)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
from sam2.sam2_image_predictor import SAM2ImagePredictor

from engine_helpers import scene
from slip.proposers.sam2_fast import Sam2PointDecoder
from slip.proposers.sam2_generator import Sam2MaskGenerator, fill_small_regions
from slip.proposers.sam2_model import build_tiny_sam2
from slip.sam_fast import WindowUpscaler, in_threes

NO_FILTERS = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0)


@pytest.fixture(scope="module")
def model():
    return build_tiny_sam2()


@pytest.fixture(scope="module")
def image():
    return scene()


def assert_same_records(ours: list[dict], official: list[dict]) -> None:
    assert len(ours) == len(official)
    for i, (a, b) in enumerate(zip(ours, official)):
        assert np.array_equal(a["segmentation"], b["segmentation"]), i
        for key in ("area", "bbox", "crop_box", "point_coords", "predicted_iou"):
            assert a[key] == b[key], (i, key, a[key], b[key])
        assert np.array_equal(a["stability_score"], b["stability_score"], equal_nan=True), i


@pytest.mark.parametrize("points, chunk", [(64, 8), (7, None), (1, None)])
def test_point_decoder_is_bit_identical_to_the_predictor(model, image, points, chunk):
    predictor = SAM2ImagePredictor(model)
    predictor.set_image(image)
    torch.manual_seed(points)
    xy = torch.rand(points, 2) * torch.tensor([image.shape[1], image.shape[0]], dtype=torch.float32)
    coords = predictor._transforms.transform_coords(xy, normalize=True, orig_hw=image.shape[:2])
    labels = torch.ones(points, 1, dtype=torch.int)
    with torch.inference_mode():
        sparse, dense = model.sam_prompt_encoder(points=(coords[:, None], labels), boxes=None, masks=None)
        feats = predictor._features
        official = model.sam_mask_decoder(
            image_embeddings=feats["image_embed"], image_pe=model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True,
            repeat_image=points > 1, high_res_features=feats["high_res_feats"])
        logits, iou = Sam2PointDecoder(model, feats, chunk=chunk)(coords)
    assert torch.equal(logits, official[0]) and torch.equal(iou, official[1])


@pytest.mark.parametrize("threads", [1, 2])
def test_direct_window_upscaler_reproduces_the_official_three_channel_resize(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        upscaler = WindowUpscaler.direct((64, 64), (150, 211))
        logits = torch.randn((6, 64, 64), generator=torch.Generator().manual_seed(threads)) * 6
        reference = in_threes(lambda x: F.interpolate(x, (150, 211), mode="bilinear", align_corners=False), logits)
        for x, ref in zip(logits, reference):
            assert torch.equal(upscaler.values(x, (0, 149), (0, 210)), ref)
            assert torch.equal(upscaler.values(x, (40, 99), (17, 80)), ref[40:100, 17:81])
    finally:
        torch.set_num_threads(before)


def test_generator_records_equal_the_official_generator(model, image):
    options = dict(points_per_side=8, box_nms_thresh=1.0, **NO_FILTERS)
    ours = Sam2MaskGenerator(model, **options).generate(image)
    official = SAM2AutomaticMaskGenerator(model, **options).generate(image)
    assert len(official) >= 150
    assert_same_records(ours, official)


def test_generator_with_crop_layers_equals_the_official(model, image):
    # (thresholds 0: the official generator fails on a crop that keeps no mask, a bug of its own)
    options = dict(points_per_side=4, crop_n_layers=1, box_nms_thresh=0.9, **NO_FILTERS)
    ours = Sam2MaskGenerator(model, **options).generate(image)
    official = SAM2AutomaticMaskGenerator(model, **options).generate(image)
    assert_same_records(ours, official)
    assert {tuple(r["crop_box"]) for r in ours} <= {tuple(r["crop_box"]) for r in official}


def test_generate_masks_and_rle_outputs_agree_with_the_records(model, image):
    generator = Sam2MaskGenerator(model, points_per_side=4, box_nms_thresh=1.0, **NO_FILTERS)
    records = generator.generate(image)
    masks = generator.generate_masks(image)
    assert len(masks) == len(records)
    assert np.array_equal(masks.masks.numpy(), np.stack([r["segmentation"] for r in records]))
    rles = generator.replace(output_mode="coco_rle").generate(image)
    from pycocotools import mask as mask_utils

    assert np.array_equal(mask_utils.decode([{**r["segmentation"], "counts": r["segmentation"]["counts"]}
                                             for r in rles]).transpose(2, 0, 1).astype(bool), masks.masks.numpy())


def test_small_regions_are_filled_and_removed_on_the_low_resolution_logits():
    logits = torch.full((1, 1, 12, 12), -5.0)
    logits[0, 0, 2:10, 2:10] = 5.0  # an object ...
    logits[0, 0, 5, 5] = -5.0  # ... with a one-pixel hole
    logits[0, 0, 0, 11] = 5.0  # and a one-pixel sprinkle
    fixed = fill_small_regions(logits, 2, 0.0)
    assert fixed[0, 0, 5, 5] == 10.0 and fixed[0, 0, 0, 11] == -10.0
    assert torch.equal(fixed[0, 0, 2:10, 2:10] > 0, torch.ones(8, 8, dtype=torch.bool))
    assert torch.equal(logits[0, 0, 5, 5], torch.tensor(-5.0))  # the input is left alone


def test_bf16_masks_are_close_to_fp32(model, image):
    options = dict(points_per_side=4, box_nms_thresh=1.0, **NO_FILTERS)
    fp32 = Sam2MaskGenerator(model, **options).generate_masks(image)
    bf16 = Sam2MaskGenerator(model, dtype="bf16", **options).generate_masks(image)
    assert abs(len(bf16) - len(fp32)) <= max(2, len(fp32) // 10)


@pytest.mark.parametrize("threads", [2])
def test_records_equal_the_official_at_two_threads_too(model, image, threads):
    """Post-processing runs on one thread whatever the caller's count; the decoder and SAM's own upscaling run
    on the caller's, so the records stay the official ones at two threads (other BLAS and resize kernels)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        options = dict(points_per_side=4, box_nms_thresh=1.0, **NO_FILTERS)
        ours = Sam2MaskGenerator(model, **options).generate(image)
        assert torch.get_num_threads() == threads  # restored
        official = SAM2AutomaticMaskGenerator(model, **options).generate(image)
    finally:
        torch.set_num_threads(before)
    assert len(official) >= 40
    assert_same_records(ours, official)
