"""Cut each segment out of the image as a small square picture for the ranker's image encoder.

For every mask: take its tight box (optionally grown by ``padding``), replace the pixels outside the
mask by the background (black, gray, a blurred copy of the image, or nothing), pad the box to a square
when asked, and resize it to ``size x size`` with antialiased bilinear interpolation.

The SLIP paper's setting is :meth:`CropConfig.paper`: black background, the tight box, no padding,
stretched (not squared) to the encoder's input size — as the authors' notebook did
(``segment_image`` on black, crop to the SAM box, ``Resize(224, 224)``).

Shapes and formats: image ``(H, W, 3) uint8`` RGB numpy or a ``(3, H, W)`` tensor (uint8, or float in
``[0, 1]``); masks ``(N, H, W) bool``; output ``(N, 3, size, size)`` float32 in ``[0, 1]`` on the
masks' device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

from slip.errors import ConfigError, ImageError
from slip.filters import tight_boxes
from slip.types import MaskSet

BACKGROUNDS = ("black", "gray", "blur", "none")
_FILL = {"black": 0.0, "gray": 0.5, "blur": 0.0, "none": 0.0}  # colour outside the image / of padding
UINT8_BACKGROUNDS = ("black", "none")  # cut out of a uint8 image before scaling to float: same values, faster


@dataclass(frozen=True)
class CropConfig:
    """How segments are cut out before they are embedded."""

    background: str = "black"  # outside the mask: "black" (0), "gray" (0.5), "blur" (blurred image), "none" (raw)
    padding: float = 0.0  # grow the tight box by this fraction of its side, on each side (0.1 = 10 %)
    square: bool = True  # pad the box to a square (keeps aspect ratio) instead of stretching it
    size: int | None = None  # output side in pixels; None = the ranker's image_size, given at call time
    blur_sigma: float = 8.0  # Gaussian sigma in pixels of the "blur" background

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ConfigError(f"unknown crop background {self.background!r}: use one of {', '.join(BACKGROUNDS)}")
        if not (self.padding >= 0.0 and math.isfinite(self.padding)):
            raise ConfigError(f"crop padding must be a fraction >= 0, got {self.padding}")
        if self.size is not None and self.size < 1:
            raise ConfigError(f"crop size must be >= 1 pixel, got {self.size}")
        if not self.blur_sigma > 0.0:
            raise ConfigError(f"blur_sigma must be > 0 pixels, got {self.blur_sigma}")

    @staticmethod
    def paper() -> "CropConfig":
        """The SLIP paper's crops: black background, tight box, no padding, stretched to the input size."""
        return CropConfig(background="black", padding=0.0, square=False)


def crop_segments(
    image: np.ndarray | torch.Tensor, segments: MaskSet, config: CropConfig, size: int | None = None
) -> torch.Tensor:
    """Cut out every segment; returns ``(N, 3, size, size)`` float32 in ``[0, 1]`` on the masks' device.

    ``size`` (pixels) overrides ``config.size``; one of them must be set. Pixels outside the image
    (from padding or squaring) get the background's constant colour: gray for "gray", black otherwise.
    An empty mask gives a crop of pure background colour. Cost: O(Σ_i |crop box_i|) plus one blur.
    """
    side = _output_side(config, size)
    device = segments.masks.device
    pixels = _to_chw(image, segments.image_size, device)
    boxes = tight_boxes(segments.masks).tolist()  # one device sync for all boxes
    crops = torch.empty((len(segments), 3, side, side), dtype=torch.float32, device=device)
    if pixels.dtype == torch.uint8 and config.background in UINT8_BACKGROUNDS:
        hwc = pixels.permute(1, 2, 0)  # a numpy image's own memory order: rows of RGB triplets
        for i, box in enumerate(boxes):
            crops[i] = _resize(_cut_uint8(hwc, segments.masks[i], box, config), side)
        return crops
    pixels = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels
    backdrop = _backdrop(pixels, config)
    for i, box in enumerate(boxes):
        crops[i] = _crop_one(pixels, backdrop, segments.masks[i], box, config, side)
    return crops


def crop_box(mask_box: tuple[int, int, int, int], config: CropConfig) -> tuple[int, int, int, int]:
    """Inclusive tight XYXY box -> half-open ``(x0, y0, x1, y1)`` crop window, padded and squared.

    The window may reach outside the image (negative or beyond ``W``/``H``); those pixels are fill.
    """
    x1, y1, x2, y2 = mask_box
    w, h = x2 + 1 - x1, y2 + 1 - y1
    px, py = round(config.padding * w), round(config.padding * h)
    x0, y0, x1, y1 = x1 - px, y1 - py, x2 + 1 + px, y2 + 1 + py
    if config.square:
        side = max(x1 - x0, y1 - y0)
        extra_x, extra_y = side - (x1 - x0), side - (y1 - y0)
        x0, x1 = x0 - extra_x // 2, x1 + (extra_x - extra_x // 2)
        y0, y1 = y0 - extra_y // 2, y1 + (extra_y - extra_y // 2)
    return x0, y0, x1, y1


# --- stages -------------------------------------------------------------------------------------------


def _output_side(config: CropConfig, size: int | None) -> int:
    side = size if size is not None else config.size
    if side is None:
        raise ConfigError("crop size unknown: pass size= (the ranker's image_size) or set CropConfig(size=...)")
    if side < 1:
        raise ConfigError(f"crop size must be >= 1 pixel, got {side}")
    return int(side)


def _to_chw(image: np.ndarray | torch.Tensor, image_size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """``(H, W, 3) uint8`` numpy or ``(3, H, W)`` tensor -> ``(3, H, W)`` on ``device``: uint8 as it is, float
    clamped to ``[0, 1]``."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ImageError(f"image must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
        tensor = torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ImageError(f"image tensor must be (3, H, W), got {tuple(image.shape)}")
        tensor = image.to(device)
    else:
        raise ImageError(f"image must be a numpy array or a torch tensor, got {type(image).__name__}")
    if tuple(tensor.shape[1:]) != tuple(image_size):
        raise ImageError(f"image is {tuple(tensor.shape[1:])} (H, W) but the masks are {tuple(image_size)}")
    if tensor.dtype == torch.uint8:
        return tensor
    if not tensor.is_floating_point():
        raise ImageError(f"image tensor must be uint8 or float in [0, 1], got {tensor.dtype}")
    return tensor.float().clamp(0.0, 1.0)


def _backdrop(pixels: torch.Tensor, config: CropConfig) -> torch.Tensor | None:
    """What shows outside the mask: a blurred copy for "blur", the image itself for "none", else None."""
    if config.background == "none":
        return pixels
    if config.background != "blur":
        return None
    radius = math.ceil(3 * config.blur_sigma)
    limit = min(pixels.shape[1:]) - 1  # reflect padding needs radius < side
    radius = max(0, min(radius, limit))
    if radius == 0:
        return pixels
    return gaussian_blur(pixels, kernel_size=2 * radius + 1, sigma=config.blur_sigma)


def _crop_one(
    pixels: torch.Tensor, backdrop: torch.Tensor | None, mask: torch.Tensor, box: list[int], config: CropConfig, side: int
) -> torch.Tensor:
    """One ``(H, W) bool`` mask with its inclusive XYXY ``box`` -> ``(3, side, side)`` float crop."""
    fill = _FILL[config.background]
    if box[2] < box[0]:  # empty mask
        return torch.full((3, side, side), fill, dtype=torch.float32, device=pixels.device)
    (x0, y0, x1, y1), (cx0, cy0, cx1, cy1) = _placement(box, config, mask.shape)
    window = (slice(None), slice(cy0, cy1), slice(cx0, cx1))
    inside = mask[cy0:cy1, cx0:cx1]
    behind = backdrop[window] if backdrop is not None else torch.tensor(fill, device=pixels.device)
    piece = torch.where(inside, pixels[window], behind)  # (3, h', w')
    piece = F.pad(piece, (cx0 - x0, x1 - cx1, cy0 - y0, y1 - cy1), value=fill)
    return _resize(piece, side)


def _placement(box: list[int], config: CropConfig, shape: tuple[int, int]
               ) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """A mask's crop window (:func:`crop_box`, may reach outside the image) and the part of it inside an
    ``(H, W)`` image, both half-open XYXY pixels."""
    x0, y0, x1, y1 = crop_box(tuple(box), config)
    h, w = shape
    return (x0, y0, x1, y1), (max(x0, 0), max(y0, 0), min(x1, w), min(y1, h))


def _cut_uint8(hwc: torch.Tensor, mask: torch.Tensor, box: list[int], config: CropConfig) -> torch.Tensor:
    """The black / "none" cut-out of an ``(H, W, 3) uint8`` image -> ``(3, h, w)`` float in ``[0, 1]``: the same
    values as :func:`_crop_one`'s float path (fill 0; ``u / 255.0`` per pixel), with a quarter of the memory
    traffic and a multiply instead of a gather (x6 faster on CPU)."""
    if box[2] < box[0]:  # empty mask: one background pixel, resized to a uniform crop
        return torch.zeros((3, 1, 1), dtype=torch.float32, device=hwc.device)
    (x0, y0, x1, y1), (cx0, cy0, cx1, cy1) = _placement(box, config, mask.shape)
    window = hwc[cy0:cy1, cx0:cx1]
    piece = torch.zeros((y1 - y0, x1 - x0, 3), dtype=torch.uint8, device=hwc.device)  # padding: black
    inner = piece[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    if config.background == "none":
        inner.copy_(window)
    else:
        torch.mul(window, mask[cy0:cy1, cx0:cx1, None], out=inner)
    return piece.permute(2, 0, 1).float().div_(255.0)


def _resize(piece: torch.Tensor, side: int) -> torch.Tensor:
    """``(3, h, w)`` float -> ``(3, side, side)``: antialiased bilinear, clamped to ``[0, 1]``."""
    out = F.interpolate(piece[None], size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return out[0].clamp_(0.0, 1.0)
