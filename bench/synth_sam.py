"""Benchmark: does a SAM's automatic mask generator find the objects of held-out synthetic scenes?

Held-out data (never seen in training: the bundled synth-sam trains on a dataset generated with seed 0
and never on ``render_scene``):

* ``composites`` — 2x2 composites (``slip.data.composites.CompositeSource``, 128 px tiles) of a synthetic
  dataset generated with ``--seed``, as the SLIP evaluation builds them;
* ``scenes`` — ``slip.data.synth.render_scene`` images (256 px) of 2-4 distinct random classes.

Every image goes through the automatic mask generator (``slip.MaskGenerator``, or the official
``SamAutomaticMaskGenerator`` with ``--generator official``); each ground-truth object with at least
``--min-area`` visible pixels scores the best IoU of any generated mask. Printed, and written to
``bench/results/synth_sam.json``.

    python -m bench.synth_sam                      # the bundled model (--sam synth), its generator.json
    python -m bench.synth_sam --sam OUT --points-per-side 16 --pred-iou-thresh 0.8

(Run it as a module: ``bench/queue.py`` would shadow the standard library's ``queue`` for
``python bench/synth_sam.py``.)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from slip.data.composites import CompositeSource
from slip.data.folder import scan_folder
from slip.data.synth import CLASS_NAMES, generate_dataset, render_scene
from slip.sam import load_sam
from slip.train.sam import read_generator_params
from slip.weights import bundled_path

RESULTS = Path(__file__).parent / "results" / "synth_sam.json"
AMG_DEFAULTS = {"points_per_side": 16, "pred_iou_thresh": 0.88, "stability_score_thresh": 0.95}


def held_out_images(seed: int, composites: int, scenes: int, workdir: Path) -> list[tuple[str, np.ndarray, np.ndarray, list[str]]]:
    """``(set name, image (H, W, 3) uint8, masks (K, H, W) bool, class names)`` of every test image."""
    out = []
    if composites:
        folder = scan_folder(generate_dataset(workdir / "heldout", classes=len(CLASS_NAMES), per_class=4, size=128, seed=seed))
        for c in CompositeSource(folder, folder.records, seed=seed).take(composites):
            out.append(("composites", c.image, c.object_masks, list(c.class_names)))
    rng = np.random.default_rng([seed, 77])
    for _ in range(scenes):
        names = [str(n) for n in rng.choice(CLASS_NAMES, size=int(rng.integers(2, 5)), replace=False)]
        image, masks = render_scene(names, rng, 256)
        out.append(("scenes", image, masks, names))
    return out


def generator_params(spec: str, overrides: dict) -> dict:
    """AMG options: defaults, then the checkpoint's ``generator.json`` (if any), then ``overrides``."""
    path = bundled_path("synth-sam") if spec == "synth" else Path(spec)
    params = {**AMG_DEFAULTS, **read_generator_params(path)}
    params.update({k: v for k, v in overrides.items() if v is not None})
    return params


def make_generator(sam, kind: str, params: dict):
    """``image -> (M, H, W) bool tensor`` of generated masks."""
    if kind == "official":
        from segment_anything import SamAutomaticMaskGenerator

        amg = SamAutomaticMaskGenerator(sam, **params)

        def run(image: np.ndarray) -> torch.Tensor:
            records = amg.generate(image)
            if not records:
                return torch.zeros((0, *image.shape[:2]), dtype=torch.bool)
            return torch.from_numpy(np.stack([r["segmentation"] for r in records]))

        return run
    from slip.generator import MaskGenerator

    amg = MaskGenerator(sam, **params)
    return lambda image: amg.generate_masks(image).masks.cpu()


def best_ious(pred: torch.Tensor, gt: np.ndarray) -> np.ndarray:
    """``(K,)`` best IoU of each ground-truth mask over the ``(M, H, W)`` predicted masks."""
    if not len(pred):
        return np.zeros(len(gt))
    g = torch.from_numpy(gt).flatten(1).float()
    p = pred.flatten(1).float()
    inter = g @ p.T
    union = g.sum(1, keepdim=True) + p.sum(1)[None] - inter
    return (inter / union.clamp(min=1)).max(1).values.numpy()


def summarise(rows: list[dict]) -> dict:
    ious = np.array([r["best_iou"] for r in rows])
    return {"objects": len(rows), "mean_best_iou": round(float(ious.mean()), 4) if len(rows) else None,
            "recall@0.5": round(float((ious >= 0.5).mean()), 4) if len(rows) else None,
            "recall@0.75": round(float((ious >= 0.75).mean()), 4) if len(rows) else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sam", default="synth", help="SAM spec (default: the bundled synth-sam)")
    parser.add_argument("--generator", choices=("slip", "official"), default="slip")
    parser.add_argument("--seed", type=int, default=1000, help="held-out data seed (training used 0)")
    parser.add_argument("--composites", type=int, default=40)
    parser.add_argument("--scenes", type=int, default=40)
    parser.add_argument("--min-area", type=int, default=64, help="GT objects with fewer visible pixels are skipped")
    parser.add_argument("--points-per-side", type=int)
    parser.add_argument("--pred-iou-thresh", type=float)
    parser.add_argument("--stability-score-thresh", type=float)
    parser.add_argument("--box-nms-thresh", type=float)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    params = generator_params(args.sam, {"points_per_side": args.points_per_side, "pred_iou_thresh": args.pred_iou_thresh,
                                         "stability_score_thresh": args.stability_score_thresh,
                                         "box_nms_thresh": args.box_nms_thresh})
    sam = load_sam(args.sam, device="cpu")
    run = make_generator(sam, args.generator, params)
    rows, masks_per_image, seconds = [], [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        images = held_out_images(args.seed, args.composites, args.scenes, Path(tmp))
    for i, (name, image, gt, classes) in enumerate(images):
        t0 = time.perf_counter()
        pred = run(image)
        seconds += time.perf_counter() - t0
        masks_per_image.append(len(pred))
        keep = gt.reshape(len(gt), -1).sum(1) >= args.min_area
        for cls, iou in zip(np.array(classes)[keep], best_ious(pred, gt[keep])):
            rows.append({"set": name, "image": i, "class": str(cls), "best_iou": float(iou)})

    result = {
        "sam": args.sam, "generator": args.generator, "generator_params": params, "seed": args.seed,
        "min_area": args.min_area, "images": len(images), "masks_per_image": round(float(np.mean(masks_per_image)), 2),
        "seconds_per_image": round(seconds / max(len(images), 1), 4), "torch_threads": torch.get_num_threads(),
        "all": summarise(rows),
        "sets": {s: summarise([r for r in rows if r["set"] == s]) for s in ("composites", "scenes")},
        "per_class": {c: summarise([r for r in rows if r["class"] == c])["mean_best_iou"]
                      for c in sorted({r["class"] for r in rows})},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"SAM {args.sam} ({args.generator} generator, {params})")
    for name, s in [("all", result["all"]), *result["sets"].items()]:
        print(f"  {name:<11} objects {s['objects']:>4}  mean best-IoU {s['mean_best_iou']}  "
              f"recall@0.5 {s['recall@0.5']}  recall@0.75 {s['recall@0.75']}")
    worst = sorted((v, k) for k, v in result["per_class"].items() if v is not None)[:5]
    print(f"  masks/image {result['masks_per_image']}  s/image {result['seconds_per_image']}  "
          f"worst classes {', '.join(f'{k} {v:.2f}' for v, k in worst)}")
    print(f"  -> {args.out}")


if __name__ == "__main__":
    main()
