"""The SLIP pipeline: stages, caching, outputs, and a ranker that really ranks."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from slip.config import SlipConfig, build_slip
from slip.crops import CropConfig, crop_segments
from slip.errors import PromptError
from slip.outputs import decode_rle, render_outputs
from slip.pipeline import SLIP
from slip.rankers.hf_clip import HFClipRanker, build_tiny_clip
from slip.request import ModelRef, SegmentOptions, resolve
from slip.types import MaskSet


def fixed_request(**options):
    """A resolved request for a pipeline whose mask generator is injected (no SAM checkpoint behind it)."""
    return resolve(SegmentOptions(**options), sam=ModelRef("fixed", "fixed", "0" * 64), sam_generator={},
                   sam_filters=None, ranker=ModelRef("test-trained", "hf-clip", "1" * 64), ranker_threshold=None)


class FixedMasks:
    """A mask generator that proposes known masks (injected in place of SAM)."""

    def __init__(self, masks: np.ndarray) -> None:
        self.masks = torch.as_tensor(masks)

    def params(self) -> dict:
        return {"fixed": len(self.masks)}

    def generate_masks(self, image: np.ndarray, *, timings=None) -> MaskSet:
        n, h, w = self.masks.shape
        base = MaskSet.empty(h, w)
        return MaskSet(
            masks=self.masks.clone(),
            boxes=torch.zeros((n, 4)),
            predicted_iou=torch.linspace(0.9, 0.8, n),
            stability_score=torch.ones(n),
            point_coords=torch.zeros((n, 2)),
            crop_boxes=base.crop_boxes.new_tensor([[0, 0, w, h]] * n),
        ).with_masks(self.masks.clone())


def _shape_image(kind: str, rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A red square or a blue circle at a random place and scale on a grey background."""
    image = np.full((size, size, 3), 128, np.uint8)
    r = int(rng.integers(5, 10))
    cy, cx = rng.integers(r, size - r, size=2)
    yy, xx = np.mgrid[:size, :size]
    if kind == "red square":
        mask = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
        image[mask] = (220, 30, 30)
    else:
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        image[mask] = (30, 30, 220)
    return image, mask


def _train_tiny_ranker(steps: int = 30) -> HFClipRanker:
    """A tiny CLIP trained for a few contrastive steps on red squares vs blue circles."""
    torch.manual_seed(0)
    model, tokenizer = build_tiny_clip(seed=0)
    ranker = HFClipRanker(model, tokenizer, spec="test-trained", device=torch.device("cpu"), dtype=torch.float32)
    classes = ["red square", "blue circle"]
    rng = np.random.default_rng(0)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        labels = rng.integers(0, 2, size=16)
        pairs = [_shape_image(classes[c], rng) for c in labels]
        images = np.stack([p[0] for p in pairs])
        masks = torch.as_tensor(np.stack([p[1] for p in pairs]))
        pixels = torch.cat(
            [crop_segments(img, FixedMasks(m[None].numpy()).generate_masks(img), CropConfig(), 32) for img, m in zip(images, masks)]
        )
        with torch.enable_grad():
            img_emb = ranker._encode_image_batch(pixels)  # differentiable (no inference_mode)
            txt_emb = ranker._encode_text_batch(classes)
            loss = F.cross_entropy(img_emb @ txt_emb.T * 10.0, torch.as_tensor(labels))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    return ranker


def test_ranking_really_ranks():
    """After training on two classes, each prompt picks the segment of its own class."""
    ranker = _train_tiny_ranker()
    rng = np.random.default_rng(123)
    square, square_mask = _shape_image("red square", rng, 32)
    circle, circle_mask = _shape_image("blue circle", rng, 32)
    image = np.concatenate([square, circle], axis=1)  # (32, 64, 3): square left, circle right
    left = np.concatenate([square_mask, np.zeros_like(square_mask)], axis=1)
    right = np.concatenate([np.zeros_like(circle_mask), circle_mask], axis=1)
    background = ~(left | right)
    pipeline = SLIP(FixedMasks(np.stack([background, right, left])), ranker, fixed_request(filters="none"))
    result = pipeline(image, ["red square", "blue circle"])
    assert [m.index for m in result.matches] == [2, 1]
    assert result.similarity.shape == (3, 2)
    assert result.similarity[2, 0] > result.similarity[1, 0]
    assert result.similarity[1, 1] > result.similarity[2, 1]


@pytest.fixture(scope="module")
def tiny_pipeline() -> SLIP:
    config = SlipConfig.of(
        sam="tiny-random",
        clip="tiny-random",
        device="cpu",
        # random weights give near-identical masks: keep them (NMS off) so every stage has work
        points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0,
        filters="dedup:0.97,min_area:4",
    )
    return build_slip(config)


@pytest.fixture()
def scene() -> np.ndarray:
    rng = np.random.default_rng(5)
    image = rng.integers(0, 60, size=(72, 96, 3), dtype=np.uint8)
    image[10:40, 10:40] = (200, 40, 40)
    image[30:60, 50:90] = (40, 200, 40)
    return image


def test_pipeline_runs_all_stages(tiny_pipeline, scene):
    result = tiny_pipeline(scene, ["a red square", "a green box"])
    n = len(result.proposals.segments)
    assert result.proposals.generated >= n > 0
    assert result.similarity.shape == (n, 2)
    assert [m.prompt for m in result.matches] == ["a red square", "a green box"]
    for m in result.matches:
        assert m.index == int(result.similarity[:, result.matches.index(m)].argmax())
        assert m.top_k[0][0] == m.index
    stats = result.proposals.filter_stats
    assert [s.name for s in stats] == ["dedup", "min_area"]
    assert stats[0].before == result.proposals.generated
    assert stats[0].before - sum(s.removed for s in stats) == n
    assert {"sam", "filters", "crops", "clip_images", "clip_text", "rank"} <= set(result.timings)


def test_stages_compose_to_the_same_result(tiny_pipeline, scene):
    """propose -> embed -> rank gives what __call__ gives (the queue caches the first two)."""
    full = tiny_pipeline(scene, ["thing"])
    proposals = tiny_pipeline.propose(scene)
    embeddings = tiny_pipeline.embed(scene, proposals)
    similarity, matches = tiny_pipeline.rank(embeddings, ["thing"])
    assert torch.allclose(similarity, full.similarity, atol=1e-5)
    assert matches[0].index == full.matches[0].index


def test_each_prompt_is_encoded_once(tiny_pipeline):
    calls: list[list[str]] = []
    ranker = tiny_pipeline.ranker
    original = ranker.encode_texts

    def counting(texts):
        calls.append(list(texts))
        return original(texts)

    ranker.encode_texts = counting
    try:
        first = tiny_pipeline.encode_prompts(["cat-x", "dog-x", "cat-x"])
        second = tiny_pipeline.encode_prompts(["dog-x", "bird-x"])
    finally:
        del ranker.encode_texts
    assert calls == [["cat-x", "dog-x"], ["bird-x"]]
    assert torch.equal(first[0], first[2]) and torch.equal(first[1], second[0])


@pytest.mark.parametrize("prompts", [[], [""], ["   "], ["ok", "\t"], ["x" * 301]])
def test_bad_prompts_are_refused(tiny_pipeline, scene, prompts):
    with pytest.raises(PromptError):
        tiny_pipeline(scene, prompts)


def test_rendered_outputs_round_trip(tiny_pipeline, scene):
    prompts = ["a red square", "a green box"]
    result = tiny_pipeline(scene, prompts)
    files = render_outputs(scene, result, prompts, tiny_pipeline.request, {"points_per_batch": 64})
    assert list(files) == ["mask_0.png", "overlay_0.png", "mask_1.png", "overlay_1.png", "segments.json"]
    doc = json.loads(files["segments.json"])
    masks = decode_rle([s["segmentation"] for s in doc["segments"]], 72, 96)
    assert np.array_equal(masks, result.proposals.segments.masks.numpy())
    assert [s["area"] for s in doc["segments"]] == masks.reshape(len(masks), -1).sum(1).tolist()
    for i, match in enumerate(result.matches):
        png = Image.open(io.BytesIO(files[f"mask_{i}.png"]))
        assert png.size == (96, 72) and png.mode == "L"
        assert np.array_equal(np.asarray(png) > 0, masks[match.index])
        assert Image.open(io.BytesIO(files[f"overlay_{i}.png"])).size == (96, 72)
        assert doc["matches"][i]["instances"] == [{"segment": match.index, "score": match.score}]
        assert doc["segments"][match.index]["similarity"][prompts[i]] == pytest.approx(match.score, abs=1e-6)
    assert doc["request"]["ranker"]["spec"] == "tiny-random" and len(doc["request"]["ranker"]["sha256"]) == 64
    assert doc["request_digest"] == tiny_pipeline.request.result_digest(prompts)
    assert doc["filters"][0]["name"] == "dedup"
    assert doc["format_version"] == 2


def test_boxes_are_pycocotools_boxes(tiny_pipeline, scene):
    """segments.json boxes are mask.toBbox of the RLE (width = x_max - x_min + 1), not one pixel short."""
    from pycocotools import mask as mask_utils

    doc = json.loads(render_outputs(scene, tiny_pipeline(scene, ["x"]), ["x"], tiny_pipeline.request)["segments.json"])
    for seg in doc["segments"]:
        rle = {"size": seg["segmentation"]["size"], "counts": seg["segmentation"]["counts"].encode()}
        assert seg["bbox"] == pytest.approx(mask_utils.toBbox(rle).tolist())
        mask = decode_rle([seg["segmentation"]], 72, 96)[0]
        ys, xs = np.nonzero(mask)
        assert seg["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
