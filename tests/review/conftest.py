"""Fixtures of the review-loop tests: a tiny "job" of synthetic scenes whose results are known masks.

Each image is a :func:`slip.data.synth.render_scene` of two classes; its segments are the two true
object masks, a background blob and half of the first object; the similarities are made up so the right
object wins each prompt, by a margin that differs per image (so doubt has an order to find). No model
runs: the exporters and importers are what is under test.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from producer.exports_items import ExportItem
from review_docs import make_doc
from slip.data.synth import render_scene

PROMPTS = ("circle", "square", "triangle")
SCENES = (("circle", "square"), ("square", "triangle"), ("triangle", "circle"), ("circle", "triangle"),
          ("square", "circle"))
SIZE = 96


@dataclass(frozen=True)
class ReviewJob:
    root: Path  # the submitted folder: img_<k>.png
    prompts: tuple[str, ...]
    items: tuple[ExportItem, ...]
    truth: tuple[dict, ...]  # per item: {prompt: (H, W) bool} of the objects in it
    margins: tuple[float, ...]  # the best-vs-second margin built into each image


@pytest.fixture(scope="session")
def review_job(tmp_path_factory) -> ReviewJob:
    root = tmp_path_factory.mktemp("job")
    items, truths, margins = [], [], []
    for k, classes in enumerate(SCENES):
        rng = np.random.default_rng([18, k])
        image, objects = render_scene(list(classes), rng, size=SIZE, scale=(0.35, 0.45))
        path = root / f"img_{k}.png"
        Image.fromarray(image).save(path)
        background = ~objects.any(0)
        background[: SIZE // 2] = False
        half = objects[0].copy()
        half[:, : SIZE // 2] = False
        masks = np.stack([objects[0], objects[1], background, half])
        margin = 0.02 + 0.04 * k  # of the first object's prompt over the half object: the image's doubt
        scores = np.zeros((4, len(PROMPTS)))  # absent prompts: far under the threshold, no margin
        for j, name in enumerate(classes):
            scores[j, PROMPTS.index(name)] = 0.3 + margin
        scores[3, PROMPTS.index(classes[0])] = 0.3
        doc = make_doc(masks, scores, PROMPTS, threshold=0.25, digest=f"{k:064x}")
        items.append(ExportItem(index=k, name=path.name, state="done", doc=doc, reason=None,
                                image=lambda p=path: p.read_bytes()))
        truths.append({name: objects[j] for j, name in enumerate(classes)})
        margins.append(margin)
    items.append(ExportItem(index=len(SCENES), name="broken.png", state="failed", doc=None, reason="corrupt image",
                            image=None))
    return ReviewJob(root, PROMPTS, tuple(items), tuple(truths), tuple(margins))
