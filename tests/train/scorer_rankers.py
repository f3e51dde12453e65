"""Hand-made rankers with known behaviour, for testing the scorer (they implement slip's Ranker protocol)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.1, 0.1, 0.9), "yellow": (0.9, 0.9, 0.1)}


def colour_dataset(root, per_class: int = 5):
    """Solid-colour classes (one directory each): a dataset a colour ranker solves perfectly."""
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(rgb) * 255 + rng.normal(0, 5, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


class ColourRanker:
    """Image embedding = mean colour of the non-black pixels; text embedding = the named colour.

    ``shift`` rotates the prompt -> colour table, making every choice land in a wrong tile.
    """

    spec = "colour"
    image_size = 16
    device = torch.device("cpu")

    def __init__(self, shift: int = 0) -> None:
        names = list(COLOURS)
        self.table = {n: COLOURS[names[(i + shift) % len(names)]] for i, n in enumerate(names)}

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        lit = (pixels.sum(1, keepdim=True) > 0.05).float()
        mean = (pixels * lit).sum((2, 3)) / lit.sum((2, 3)).clamp_min(1)
        return torch.nn.functional.normalize(mean, dim=-1)

    def encode_texts(self, texts) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.tensor([self.table[t] for t in texts]), dim=-1)


class ConstantRanker:
    """Every image and every text gets the same embedding: the argmax is always segment 0."""

    spec = "constant"
    image_size = 8
    device = torch.device("cpu")

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.ones(len(pixels), 4) / 2

    def encode_texts(self, texts) -> torch.Tensor:
        return torch.ones(len(texts), 4) / 2


class ColourJudge:
    """A classifier judge that names the colour nearest to a crop's mean non-black colour."""

    image_size = 16
    class_names = tuple(sorted(COLOURS))

    def classify(self, pixels: torch.Tensor) -> torch.Tensor:
        colours = torch.nn.functional.normalize(torch.tensor([COLOURS[n] for n in self.class_names]), dim=-1)
        return (ColourRanker().encode_images(pixels) @ colours.T).argmax(1)
