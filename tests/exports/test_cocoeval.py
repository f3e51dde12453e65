"""COCOeval end to end: ``slip data synth --coco`` ground truth, the real pipeline with the bundled models,
results through the ``coco-results`` exporter, pycocotools alone to score them."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from producer.exports import read_coco_ids, write_export
from slip.data.synth import CLASS_NAMES, MASK_SUFFIX


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def _segm_ap(gt_path, results_path) -> float:
    gt = _quiet(COCO, str(gt_path))
    dt = _quiet(gt.loadRes, str(results_path))
    evaluator = COCOeval(gt, dt, "segm")
    _quiet(evaluator.evaluate)
    _quiet(evaluator.accumulate)
    _quiet(evaluator.summarize)
    return float(evaluator.stats[0])  # AP @ IoU 0.50:0.95


def test_synth_coco_ground_truth_matches_the_dataset(synth_run):
    gt = json.loads(synth_run.truth.read_text())
    assert [c["name"] for c in gt["categories"]] == list(CLASS_NAMES[:3])
    assert len(gt["images"]) == len(gt["annotations"]) == 6
    coco = _quiet(COCO, str(synth_run.truth))
    for image in gt["images"]:
        assert not image["file_name"].startswith("/") and (synth_run.root / image["file_name"]).is_file()
        (ann,) = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        truth = np.asarray(Image.open(synth_run.root / image["file_name"].replace(".png", MASK_SUFFIX))) > 127
        assert np.array_equal(coco.annToMask(ann).astype(bool), truth)
        assert ann["bbox"] == [float(v) for v in mask_utils.toBbox(ann["segmentation"])]
        assert ann["area"] == int(truth.sum())
        category = coco.cats[ann["category_id"]]["name"]
        assert image["file_name"].startswith(category.replace(" ", "_") + "/")


def test_cocoeval_scores_the_exported_results(synth_run, tmp_path):
    ids = read_coco_ids(synth_run.truth)
    results = tmp_path / "results.json"
    summary = write_export(synth_run.items, format="coco-results", out=results, prompts=synth_run.prompts,
                           job_id="synth", image_ids=ids.image_ids, category_ids=ids.category_ids)
    assert summary.written == 6 and summary.skipped == 0
    ap = _segm_ap(synth_run.truth, results)

    # the same detections with every category moved to the next one: a wrong assignment (every image has
    # a detection of each prompt, so this permutes which score each category gets)
    detections = json.loads(results.read_text())
    order = sorted(ids.category_ids.values())
    for d in detections:
        d["category_id"] = order[(order.index(d["category_id"]) + 1) % len(order)]
    shuffled = tmp_path / "shuffled.json"
    shuffled.write_text(json.dumps(detections))
    wrong = _segm_ap(synth_run.truth, shuffled)
    print(f"segm AP {ap:.3f}, with shifted categories {wrong:.3f}")
    assert ap > wrong + 0.25, (ap, wrong)


def test_regenerating_without_coco_drops_the_stale_ground_truth(tmp_path):
    from slip.data.synth import COCO_FILE, generate_dataset

    generate_dataset(tmp_path, classes=1, per_class=1, size=32, coco=True)
    assert json.loads((tmp_path / COCO_FILE).read_text())["images"][0]["file_name"] == "circle/00000.png"
    generate_dataset(tmp_path, classes=1, per_class=1, size=32, seed=5)
    assert not (tmp_path / COCO_FILE).exists()
