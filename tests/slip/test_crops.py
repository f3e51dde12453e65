"""Segment crops: shapes, backgrounds, square padding, context padding, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms.functional import gaussian_blur

from slip.crops import CropConfig, crop_box, crop_segments
from slip.errors import ConfigError, ImageError
from slip.types import MaskSet


def segments_of(*masks: torch.Tensor) -> MaskSet:
    stacked = torch.stack(masks)
    h, w = stacked.shape[1:]
    return MaskSet.empty(h, w).with_masks(stacked) if len(masks) else MaskSet.empty(h, w)


def rect(h, w, y0, x0, y1, x1) -> torch.Tensor:
    m = torch.zeros((h, w), dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def two_corners(h=40, w=40) -> torch.Tensor:
    """A 30x30 box at (5, 5) whose mask is only its top-left and bottom-right 4x4 corners."""
    return rect(h, w, 5, 5, 9, 9) | rect(h, w, 31, 31, 35, 35)


@pytest.fixture
def noise_image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)


def test_shapes_dtype_range_and_device(noise_image):
    segments = segments_of(rect(40, 40, 0, 0, 10, 20), rect(40, 40, 5, 5, 39, 8), two_corners())
    for background in ("black", "gray", "blur", "none"):
        crops = crop_segments(noise_image, segments, CropConfig(background=background), 24)
        assert crops.shape == (3, 3, 24, 24) and crops.dtype == torch.float32
        assert crops.device == segments.masks.device
        assert float(crops.min()) >= 0.0 and float(crops.max()) <= 1.0


@pytest.mark.parametrize("background", ["black", "gray", "blur", "none"])
def test_background_pixels_at_native_size(noise_image, background):
    """At size == box side the resize is the identity, so every pixel can be checked exactly."""
    mask = two_corners()
    crop = crop_segments(noise_image, segments_of(mask), CropConfig(background=background), 30)[0]
    image = torch.from_numpy(noise_image).permute(2, 0, 1).float() / 255
    window = (slice(None), slice(5, 35), slice(5, 35))
    inside = mask[5:35, 5:35]
    expected_behind = {
        "black": torch.zeros_like(image[window]),
        "gray": torch.full_like(image[window], 0.5),
        "blur": gaussian_blur(image, kernel_size=2 * 24 + 1, sigma=8.0)[window],
        "none": image[window],
    }[background]
    expected = torch.where(inside, image[window], expected_behind)
    torch.testing.assert_close(crop, expected, atol=1e-5, rtol=0)


def test_black_and_gray_background_after_resizing():
    white = np.full((40, 40, 3), 255, dtype=np.uint8)
    black = crop_segments(white, segments_of(two_corners()), CropConfig(background="black"), 64)[0]
    gray = crop_segments(white, segments_of(two_corners()), CropConfig(background="gray"), 64)[0]
    assert float(black[:, 24:40, 24:40].abs().max()) == 0.0  # the middle of the box is not in the mask
    torch.testing.assert_close(gray[:, 24:40, 24:40], torch.full((3, 16, 16), 0.5), atol=1e-5, rtol=0)
    assert float(black[:, :4, :4].min()) > 0.99  # the mask's own (white) pixels survive


def test_square_padding_keeps_the_aspect_ratio():
    white = np.full((64, 64, 3), 255, dtype=np.uint8)
    wide = rect(64, 64, 20, 10, 30, 50)  # 10 rows x 40 columns
    crop = crop_segments(white, segments_of(wide), CropConfig(square=True), 80)[0]
    rows = int((crop[0].max(1).values > 0.5).sum())
    cols = int((crop[0].max(0).values > 0.5).sum())
    assert cols == 80 and rows == 20  # 1:4, centred
    assert float(crop[:, :25].max()) == 0.0 and float(crop[:, 55:].max()) == 0.0
    stretched = crop_segments(white, segments_of(wide), CropConfig.paper(), 80)[0]
    assert float(stretched.min()) > 0.99  # the paper's crops stretch the box to fill the square


def test_padding_grows_the_crop():
    white = np.full((64, 64, 3), 255, dtype=np.uint8)
    square = rect(64, 64, 20, 20, 40, 40)
    tight = crop_segments(white, segments_of(square), CropConfig(padding=0.0), 40)[0]
    padded = crop_segments(white, segments_of(square), CropConfig(padding=0.5), 40)[0]
    assert int((tight[0] > 0.5).sum()) == 40 * 40
    assert int((padded[0] > 0.5).sum()) == 20 * 20  # a 40-px window with the 20-px object in the middle
    assert crop_box((20, 20, 39, 39), CropConfig(padding=0.5)) == (10, 10, 50, 50)


def test_outside_the_image_is_filled_with_the_background_colour():
    white = np.full((32, 32, 3), 255, dtype=np.uint8)
    corner = rect(32, 32, 0, 0, 8, 8)  # padding reaches 4 px beyond the top-left edge
    crop = crop_segments(white, segments_of(corner), CropConfig(background="gray", padding=0.5), 16)[0]
    assert crop_box((0, 0, 7, 7), CropConfig(padding=0.5)) == (-4, -4, 12, 12)
    torch.testing.assert_close(crop[:, :4, :4], torch.full((3, 4, 4), 0.5), atol=1e-5, rtol=0)
    assert float(crop[:, 4:12, 4:12].min()) > 0.99


def test_empty_maskset_and_empty_mask():
    image = np.zeros((20, 30, 3), dtype=np.uint8)
    assert crop_segments(image, MaskSet.empty(20, 30), CropConfig(), 16).shape == (0, 3, 16, 16)
    crops = crop_segments(image + 255, segments_of(torch.zeros((20, 30), dtype=torch.bool)), CropConfig(background="gray"), 8)
    torch.testing.assert_close(crops, torch.full((1, 3, 8, 8), 0.5))


def test_tensor_image_matches_numpy(noise_image):
    segments = segments_of(two_corners(), rect(40, 40, 3, 7, 20, 12))
    config = CropConfig(background="blur", padding=0.2)
    from_numpy = crop_segments(noise_image, segments, config, 32)
    from_uint8 = crop_segments(torch.from_numpy(noise_image).permute(2, 0, 1), segments, config, 32)
    from_float = crop_segments(torch.from_numpy(noise_image).permute(2, 0, 1) / 255.0, segments, config, 32)
    torch.testing.assert_close(from_uint8, from_numpy)
    torch.testing.assert_close(from_float, from_numpy)


@pytest.mark.parametrize("background", ["black", "none"])
@pytest.mark.parametrize("padding, square", [(0.0, True), (0.3, True), (0.1, False)])
def test_the_uint8_cut_out_equals_the_float_one_bit_for_bit(noise_image, background, padding, square):
    """A uint8 image is cut out before it is scaled to float (black and "none" fill with 0): every value must be
    the float path's, windows reaching outside the image and an empty mask included."""
    segments = segments_of(two_corners(), rect(40, 40, 3, 7, 20, 12), rect(40, 40, 30, 0, 40, 40),
                           torch.zeros((40, 40), dtype=torch.bool))
    config = CropConfig(background=background, padding=padding, square=square)
    from_uint8 = crop_segments(noise_image, segments, config, 24)
    from_float = crop_segments(torch.from_numpy(noise_image).permute(2, 0, 1).float() / 255.0, segments, config, 24)
    assert torch.equal(from_uint8, from_float)


def test_size_comes_from_config_or_argument(noise_image):
    segments = segments_of(two_corners())
    assert crop_segments(noise_image, segments, CropConfig(size=12)).shape[-1] == 12
    assert crop_segments(noise_image, segments, CropConfig(size=12), 20).shape[-1] == 20
    with pytest.raises(ConfigError, match="size"):
        crop_segments(noise_image, segments, CropConfig())


def test_paper_setting():
    assert CropConfig.paper() == CropConfig(background="black", padding=0.0, square=False)


@pytest.mark.parametrize(
    "kwargs", [{"background": "white"}, {"padding": -0.1}, {"padding": float("nan")}, {"size": 0}, {"blur_sigma": 0.0}]
)
def test_bad_config(kwargs):
    with pytest.raises(ConfigError):
        CropConfig(**kwargs)


def test_bad_images(noise_image):
    segments = segments_of(two_corners())
    with pytest.raises(ImageError, match="masks"):
        crop_segments(noise_image[:30], segments, CropConfig(), 8)
    with pytest.raises(ImageError):
        crop_segments(noise_image[..., 0], segments, CropConfig(), 8)
    with pytest.raises(ImageError):
        crop_segments(noise_image.astype(np.float32), segments, CropConfig(), 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(noise_image):
    segments = segments_of(two_corners(), rect(40, 40, 3, 7, 20, 12))
    for background in ("black", "gray", "blur", "none"):
        config = CropConfig(background=background, padding=0.1)
        on_gpu = crop_segments(noise_image, segments.to("cuda"), config, 32)
        assert on_gpu.device.type == "cuda"
        torch.testing.assert_close(on_gpu.cpu(), crop_segments(noise_image, segments, config, 32), atol=1e-4, rtol=0)
