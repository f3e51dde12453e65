"""The interface every ranker (CLIP-like dual encoder) implements."""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch


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
