"""The HTML gallery: real results of the bundled models, truth from a COCO file, rendered in headless
Chromium (screenshot and DOM)."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from browser import chromium
from export_docs import disc, done_item, failed_item, v2_doc
from producer.exports import answers
from producer.gallery import PALETTE, THUMB_PX, coco_truth, write_gallery
from slip.errors import DatasetError

FAILURE = "ImageError: cannot identify image file"


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def _extra_items(prompts) -> list:
    """A large photo-like image where the second prompt is explicitly not found, and a failure."""
    h, w = 480, 640
    yy, xx = np.mgrid[:h, :w]
    image = np.stack([xx * 255 // w, yy * 255 // h, np.full((h, w), 90)], -1).astype(np.uint8)
    doc = v2_doc(disc(h, w, 200, 300, 120)[None], prompts, {prompts[0]: [(0, 0.61)], prompts[1]: []}, threshold=0.3)
    return [done_item(100, "big/photo.png", doc, image=_png(image)),
            failed_item(101, "broken.jpg", FAILURE)]


def _cards(page: str) -> dict[str, str]:
    """name -> the card's HTML."""
    cards = {}
    for card in page.split("<figure")[1:]:
        cards[re.search(r'<div class="name">(.*?)</div>', card).group(1)] = card
    return cards


def _expected_mark(doc, prompt, truth_masks, prompts) -> str:
    (answer,) = [a for a in answers(doc, prompts) if a.prompt == prompt]
    chosen = np.zeros_like(truth_masks[prompt])
    for inst in answer.instances:
        chosen |= inst.mask()
    true = truth_masks[prompt]
    union = (chosen | true).sum()
    return "hit" if (union == 0 or (chosen & true).sum() / union > 0.5) else "miss"


def test_gallery_renders_answers_truth_and_failures(synth_run, tmp_path):
    prompts = synth_run.prompts
    items = [*synth_run.items, *_extra_items(prompts)]
    truth = coco_truth(synth_run.truth)
    page_path = write_gallery(items, out=tmp_path / "g", prompts=prompts, job_id="job-1", title="Synth gallery",
                              note="bundled synth models", truth=truth)
    page = page_path.read_text()
    assert "pixelated" not in page
    cards = _cards(page)
    assert len(cards) == len(items)

    # hit / miss marks agree with an independent IoU computation against the COCO truth
    for item in synth_run.items:
        expected = truth(item.name)
        for prompt in prompts:
            line = re.search(rf'<b class="prompt">{prompt}</b>.*?</li>', cards[item.name]).group(0)
            assert f'class="{_expected_mark(item.doc, prompt, expected, prompts)}"' in line, line
    assert "not found" in cards["big/photo.png"] and "threshold 0.300" in cards["big/photo.png"]
    assert "hit" not in cards["big/photo.png"]  # not in the truth: not judged
    assert FAILURE in cards["broken.jpg"]

    # thumbnails: downscaled, never upscaled
    thumbs = sorted((tmp_path / "g" / "thumbs").iterdir())
    assert len(thumbs) == len(synth_run.items) + 1
    sizes = {Image.open(t).size for t in thumbs}
    assert (THUMB_PX, THUMB_PX * 3 // 4) in sizes and max(max(s) for s in sizes) <= THUMB_PX

    dom = chromium("--dump-dom", page_path.as_uri()).stdout
    for text in [*prompts, "not found", FAILURE, "hit", "Summary"]:
        assert text in dom, text
    shot = tmp_path / "shot.png"
    chromium(f"--screenshot={shot}", "--window-size=1280,1600", page_path.as_uri())
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.std() > 20  # not blank
    red = np.array([int(PALETTE[0][k : k + 2], 16) for k in (1, 3, 5)])
    assert (np.abs(pixels - red).sum(-1) < 40).sum() > 200  # the first prompt's outlines and labels are drawn


def test_gallery_limit_escaping_and_missing_images(tmp_path):
    prompts = ("<b>circle</b>", "star")
    doc = v2_doc(disc(40, 40, 20, 20, 8)[None], prompts, {prompts[0]: [(0, 0.5)], prompts[1]: []})
    items = [done_item(k, f"<img src=x onerror=alert({k})>.png", doc) for k in range(5)]
    page = write_gallery(iter(items), out=tmp_path, prompts=prompts, job_id="j", title="t", note="n", limit=2)
    html = page.read_text()
    assert html.count("<figure") == 2 and "stopped at the limit of 2 images" in html
    assert "<b>circle</b>" not in html and "&lt;b&gt;circle&lt;/b&gt;" in html
    assert "<img src=x" not in html and "no image" in html
    assert "not answered" not in html


def test_coco_truth_refuses_a_non_coco_file(tmp_path):
    (tmp_path / "gt.json").write_text('{"images": 3}')
    with pytest.raises(DatasetError, match="not a COCO annotation file"):
        coco_truth(tmp_path / "gt.json")
    with pytest.raises(DatasetError, match="cannot read"):
        coco_truth(tmp_path / "missing.json")


def _frame_box(pixels: np.ndarray, colour: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the pixels of exactly ``colour`` (the picture's flat background)."""
    ys, xs = np.nonzero((pixels == colour).all(-1))
    return ys.min(), xs.min(), ys.max() + 1, xs.max() + 1


def test_prompts_that_share_a_segment_each_show_their_outline(tmp_path):
    """Two prompts choose the same segment: both colours show along its outline (dash by dash, not one
    outline hidden under the other), under one label naming both."""
    h, w = 240, 320
    background = (255, 255, 0)
    image = np.zeros((h, w, 3), np.uint8) + np.array(background, np.uint8)
    prompts = ("circle", "round thing", "square")
    masks = np.stack([disc(h, w, 120, 160, 80), disc(h, w, 30, 30, 15)])
    doc = v2_doc(masks, prompts, {"circle": [(0, 0.61)], "round thing": [(0, 0.55)], "square": [(1, 0.3)]})
    page = write_gallery([done_item(0, "shared.png", doc, image=_png(image))], out=tmp_path / "g", prompts=prompts,
                         job_id="j", title="shared", note="n")
    dom = chromium("--dump-dom", page.as_uri()).stdout
    svg = re.search(r"<svg.*?</svg>", dom, re.S).group(0)
    texts = re.findall(r"<text.*?</text>", svg, re.S)
    assert len(texts) == 2, texts  # one label per outlined segment
    shared = next(t for t in texts if "circle" in t)
    assert "round thing" in shared and shared.count("<tspan") == 2

    shot = tmp_path / "shot.png"
    chromium(f"--screenshot={shot}", "--window-size=700,700", page.as_uri())
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    top, left, bottom, right = _frame_box(pixels, background)
    lower = pixels[top + (bottom - top) * 3 // 5 : bottom, left:right]  # below the labels: outline only
    counts = []
    for c in range(2):
        rgb = np.array([int(PALETTE[c][k : k + 2], 16) for k in (1, 3, 5)])
        counts.append(int((np.abs(lower - rgb).sum(-1) < 40).sum()))
    assert min(counts) > 40, f"outline pixels per prompt colour along the shared outline: {counts}"


def test_summary_separates_hits_on_present_objects_from_correct_not_found(tmp_path):
    h, w = 60, 80
    present, elsewhere = disc(h, w, 30, 40, 12), disc(h, w, 10, 10, 6)
    prompts = ("circle", "square", "star", "moon")
    doc = v2_doc(np.stack([present, elsewhere]), prompts,
                 {"circle": [(0, 0.9)], "square": [], "star": [], "moon": [(1, 0.4)]})
    absent = np.zeros((h, w), bool)
    truth = {"circle": present, "square": disc(h, w, 40, 60, 8), "star": absent, "moon": absent}
    page = write_gallery([done_item(0, "a.png", doc)], out=tmp_path, prompts=prompts, job_id="j", title="t",
                         note="n", truth=lambda name: truth).read_text()
    summary = re.search(r'<section id="summary">(.*?)</section>', page).group(1)
    assert "objects present: 1 of 2 found (50%, IoU &gt; 0.5)" in summary, summary
    assert "objects absent: 1 of 2 correctly not found (50%)" in summary, summary
    card = _cards(page)["a.png"]
    assert re.search(r'<b class="prompt">star</b>.*?class="hit">✓ absent, correctly not found', card)
    assert re.search(r'<b class="prompt">moon</b>.*?class="miss">✗ absent, but found', card)
    assert re.search(r'<b class="prompt">square</b>.*?class="miss">✗ miss: not found', card)
