"""The HTML report: self-contained, every section present, the best grid cell marked."""

from __future__ import annotations

import base64
import re

import numpy as np

from slip.data.composites import CompositeSource
from slip.data.folder import scan_folder, split_records
from slip.evaluate import evaluate, summarize
from slip.report import GalleryItem, build_report, gallery_item, overlay

from scorer_rankers import ConstantRanker


def test_overlay_marks_hits_green_and_misses_red():
    image = np.full((20, 20, 3), 128, np.uint8)
    hit, miss = np.zeros((20, 20), bool), np.zeros((20, 20), bool)
    hit[2:8, 2:8] = True
    miss[12:18, 12:18] = True
    png = overlay(image, [hit, miss, None], [True, False, False], scale=1)
    from io import BytesIO
    from PIL import Image
    out = np.asarray(Image.open(BytesIO(png)).convert("RGB")).astype(int)
    assert out[2, 2, 1] > out[2, 2, 0]  # hit outline: green
    assert out[12, 12, 0] > out[12, 12, 1]  # miss outline: red
    assert tuple(out[0, 19]) == (128, 128, 128)  # untouched elsewhere


def test_report_is_self_contained_with_all_sections(synth_dir):
    folder = scan_folder(synth_dir)
    _, val = split_records(folder.records, seed=0)
    composites = CompositeSource(folder, val, seed=0, tile_size=32).take(3)
    kept = []
    results = evaluate(ConstantRanker(), composites, keep=lambda ev: kept.append(gallery_item(ev, ranker="constant")))
    grid = [{"lr": 1e-4, "proj_dim": 128, "val_loss": 0.78}, {"lr": 1e-3, "proj_dim": 128, "val_loss": 2.07},
            {"lr": 1e-5, "proj_dim": 512, "val_loss": None}]
    curve = {"epochs": [{"epoch": 1, "train_loss": 3.0, "val_loss": 2.5}, {"epoch": 2, "train_loss": 2.0, "val_loss": 2.2}],
             "best_epoch": 2}
    page = build_report([{"ranker": "constant", "summary": summarize(results)}], grid, {"run": curve}, kept)
    assert page.startswith("<!doctype html>") and "</html>" in page
    assert not re.search(r"(src|href)=\"https?:", page)  # nothing fetched from elsewhere
    assert "25.0%" in page and "Fine-tuned SLIP" in page  # our accuracy and the paper's reference row
    best_row = re.search(r'<tr class="best"><td>([^<]+)</td><td>(\d+)</td>', page)
    assert best_row.groups() == ("0.0001", "128") and "failed" in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 1 + 3  # one curve, three gallery composites
    assert all(base64.b64decode(i)[:4] == b"\x89PNG" for i in images)
    assert page.count('class="hit"') + page.count('class="miss"') == 12
    item = kept[0]
    assert GalleryItem.from_json(item.to_json()) == item
