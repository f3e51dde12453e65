"""Every instance of a prompt, on real models: the bundled synth SAM + synth ranker on a drawn 2x2 scene
(two circles, a star and a house), ranked by slip.ranking.rank with thresholds, one-to-one and dedup."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slip.calibrate import read_threshold
from slip.config import SlipConfig, build_slip
from slip.data.synth import render_object
from slip.ranking import rank
from slip.weights import BUNDLED_DIR

TILE = 128  # px, the synthetic world's training size
SCENE = (("circle", 1), ("star", 2), ("house", 3), ("circle", 4))  # tile k: (class, render seed)


@pytest.fixture(scope="module")
def scene():
    """``(image (256, 256, 3) uint8, true masks (4, 256, 256) bool, proposals, embeddings (N, D), pipeline)``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    image = np.zeros((2 * TILE, 2 * TILE, 3), np.uint8)
    truth = np.zeros((4, 2 * TILE, 2 * TILE), bool)
    for k, (name, seed) in enumerate(SCENE):
        pixels, mask = render_object(name, np.random.default_rng(seed), TILE)
        y, x = (k // 2) * TILE, (k % 2) * TILE
        image[y : y + TILE, x : x + TILE], truth[k, y : y + TILE, x : x + TILE] = pixels, mask
    slip = build_slip(SlipConfig.of(sam="synth", clip="synth", device="cpu"))
    proposals = slip.propose(image)
    embeddings = slip.embed(image, proposals)
    yield image, truth, proposals, embeddings, slip
    torch.set_num_threads(threads)


def found(match, masks: torch.Tensor, truth: np.ndarray) -> list[int]:
    """The tile of the true object each instance of ``match`` covers (IoU > 0.5), -1 for none."""
    out = []
    for i, _ in match.instances:
        m = masks[i].numpy()
        ious = [(m & t).sum() / (m | t).sum() for t in truth]
        out.append(int(np.argmax(ious)) if max(ious) > 0.5 else -1)
    return out


def ranked(scene, prompts, **kwargs):
    _, _, proposals, embeddings, slip = scene
    return rank(embeddings, slip.encode_prompts(prompts), prompts, masks=proposals.segments.masks, **kwargs)[1]


def test_all_instances_finds_both_circles_and_one_finds_one(scene):
    truth, masks = scene[1], scene[2].segments.masks
    (every,) = ranked(scene, ["circle"], instances="all", threshold=0.5)
    assert sorted(found(every, masks, truth)) == [0, 3]
    (one,) = ranked(scene, ["circle"], threshold=0.5)
    assert len(one.instances) == 1 and found(one, masks, truth)[0] in (0, 3)
    (argmax,) = ranked(scene, ["circle"], instances="all")  # no threshold: the argmax only
    assert argmax.instances == one.instances


def test_thresholds_per_prompt_and_an_absent_class(scene):
    truth, masks = scene[1], scene[2].segments.masks
    circle, star, triangle = ranked(scene, ["circle", "star", "triangle"], instances="all", threshold=[0.5, 0.25, 0.5])
    assert sorted(found(circle, masks, truth)) == [0, 3] and found(star, masks, truth) == [1]
    assert triangle.instances == () and not triangle.matched and triangle.best is not None  # an explicit empty answer
    (strict_star,) = ranked(scene, ["star"], instances="all", threshold=0.6)
    assert strict_star.instances == ()


def test_one_to_one_instances_never_share_a_segment(scene):
    truth, masks = scene[1], scene[2].segments.masks
    matches = ranked(scene, ["circle", "round shape", "house"], instances="all", threshold=0.2, one_to_one=True)
    used = [i for m in matches for i, _ in m.instances]
    assert len(used) == len(set(used))
    assert found(matches[2], masks, truth) == [2]
    circles = found(matches[0], masks, truth) + found(matches[1], masks, truth)
    assert sorted(t for t in circles if t in (0, 3)) == [0, 3]  # each circle serves exactly one of the two


def test_a_duplicated_segment_is_one_instance(scene):
    proposals, embeddings, slip = scene[2], scene[3], scene[4]
    masks = proposals.segments.masks
    (first,) = ranked(scene, ["circle"], threshold=0.5)
    i = first.index
    copy = masks[i].clone()
    copy[masks[i].nonzero()[0, 0]] = False  # its top row less: IoU > 0.99 with the original
    doubled = torch.cat([masks, copy[None]])
    emb = torch.cat([embeddings, embeddings[i : i + 1]])  # the same score, up to the matrix product's rounding
    _, (m,) = rank(emb, slip.encode_prompts(["circle"]), ["circle"], instances="all", threshold=0.5, masks=doubled)
    kept = {j for j, _ in m.instances}
    assert len(m.instances) == 2 and len(kept & {i, len(masks)}) == 1, m.instances  # one of the pair
    _, (loose,) = rank(emb, slip.encode_prompts(["circle"]), ["circle"], instances="all", threshold=0.5,
                       masks=doubled, dedup_iou=1.0)  # nothing is a duplicate
    assert len(loose.instances) == 3


def test_the_bundled_calibrated_threshold_finds_both_circles_and_no_triangle(scene):
    threshold = read_threshold(BUNDLED_DIR / "synth-clip")
    assert threshold is not None and -1 <= threshold <= 1
    truth, masks = scene[1], scene[2].segments.masks
    circle, triangle = ranked(scene, ["circle", "triangle"], instances="all", threshold=threshold)
    assert sorted(found(circle, masks, truth)) == [0, 3] and triangle.instances == ()
