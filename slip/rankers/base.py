"""The interface every ranker (CLIP-like dual encoder) implements."""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F


@runtime_checkable
class Ranker(Protocol):
    """Embeds image crops and text prompts into one space; both outputs have unit L2 norm.

    The pipeline hands ``encode_images`` square crops already resized to ``image_size`` with pixel
    values in ``[0, 1]``; the ranker applies its own normalisation (mean/std) inside.
    """

    spec: str  # the spec string it was loaded from, recorded in every result
    image_size: int  # side in pixels of the square crops encode_images expects
    device: torch.device  # where its weights live

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` float in ``[0, 1]`` (any device) -> ``(B, D)`` float, unit norm."""
        ...

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """``P`` strings -> ``(P, D)`` float, unit norm, on ``device``."""
        ...


def sigmoid_scores(similarity: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor) -> torch.Tensor:
    """Cosines -> the pairwise probabilities of a model trained with a sigmoid loss (SigLIP; open_clip models
    with a ``logit_bias``): ``sigmoid(exp(logit_scale) * cos + logit_bias)``, float32, same shape. Monotonic,
    so the ranking is unchanged; thresholds are on this scale."""
    scale = logit_scale.detach().float().exp().to(similarity.device)
    bias = logit_bias.detach().float().to(similarity.device)
    return torch.sigmoid(similarity.float() * scale + bias)


def resize_square(pixels: torch.Tensor, side: int) -> torch.Tensor:
    """``(B, 3, H, W)`` float in ``[0, 1]`` -> ``(B, 3, side, side)`` (bicubic, antialiased, clamped to
    ``[0, 1]``); returned as it is when it already has that size."""
    if pixels.shape[-2:] == (side, side):
        return pixels
    return F.interpolate(pixels, size=(side, side), mode="bicubic", antialias=True, align_corners=False).clamp_(0.0, 1.0)
