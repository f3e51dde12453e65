"""EdgeTAM and the SAM 3 tracker as proposers: slip's HfTrackerMaskGenerator vs transformers'
``pipeline("mask-generation")`` on the same model and image, per image.

    python bench/hf_trackers.py                                  # tiny-random models + EdgeTAM's real architecture
    python bench/hf_trackers.py --models real-size-edgetam --points-per-side 16 --repeats 5 --out /tmp/x.json
    python bench/hf_trackers.py --models edgetam sam3-tracker    # cached snapshots (slip weights fetch ...)

Both get the same model, image (a square scene: the pipeline misplaces grid points on other shapes) and options:
thresholds 0 (every candidate goes through each side's post-processing), NMS at ``--nms`` (the pipeline's
``crops_nms_thresh``, slip's ``box_nms_thresh``), no crop layers, ``points_per_batch`` 64. One untimed warm-up
run of each, then ``--repeats`` rounds of pipeline, ours (interleaved, so that load from other processes hits both
alike); seconds per image as median with min and max, the speed-up as the ratio of the medians. The last round's
outputs are compared: mask count, order, masks (bit for bit), scores. ``real-size-edgetam`` is EdgeTAM's
architecture (RepViT-M1 backbone, 256-wide decoder, 1024 input) with seeded random weights: the time per forward
pass of the real model, masks that are noise. Writes JSON (with the command) to ``bench/results/`` (``--out``).
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this file's folder is sys.path[0], and bench/queue.py would shadow the standard `queue` module
_HERE, ROOT = Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

REAL_SIZE_EDGETAM = "real-size-edgetam"
DEFAULT_MODELS = ("tiny-random-edgetam", "tiny-random-sam3-tracker", REAL_SIZE_EDGETAM)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                   help=f"SAM specs (tiny-random-edgetam, tiny-random-sam3-tracker, edgetam, sam3-tracker, a "
                        f"directory) or {REAL_SIZE_EDGETAM}")
    p.add_argument("--size", type=int, default=256, help="side of the square scene, pixels")
    p.add_argument("--points-per-side", type=int, default=None, help="default: 12 (tiny models), 6 (real sizes)")
    p.add_argument("--nms", type=float, default=0.7)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "hf-trackers-cpu.json")
    return p.parse_args()


def scene(size: int, seed: int = 0) -> np.ndarray:
    """``(size, size, 3) uint8``: a shaded background with discs and boxes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    image = np.stack([60 + 60 * xx / size, 90 + 40 * yy / size, 80 + 0 * xx], -1)
    for _ in range(8):
        cx, cy, r = rng.uniform(0, size, 2).tolist() + [rng.uniform(size / 16, size / 5)]
        image[(xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2] = rng.integers(0, 256, 3)
    for _ in range(4):
        x0, y0 = rng.integers(0, size * 3 // 4, 2)
        w, h = rng.integers(size // 10, size // 4, 2)
        image[y0 : y0 + h, x0 : x0 + w] = rng.integers(0, 256, 3)
    return np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)


def load(spec: str):
    """``(model with its image processor, ref)`` for a spec, or EdgeTAM's real architecture with random weights."""
    from slip.proposers.loading import load_proposer_model

    if spec != REAL_SIZE_EDGETAM:
        loaded = load_proposer_model(spec, device="cpu")
        return loaded.model, loaded.ref.to_json()
    import transformers as tf

    from slip.proposers.hf_trackers import attach_processor
    from slip.weights import tensors_sha256

    backbone = tf.TimmWrapperConfig(architecture="repvit_m1",
                                    model_args={"in_chans": 3, "features_only": True, "out_indices": [0, 1, 2, 3]})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tf.EdgeTamModel(tf.EdgeTamConfig(vision_config=dict(backbone_config=backbone))).eval()
    attach_processor(model, tf.Sam2ImageProcessor())
    return model, {"spec": spec, "arch": "edgetam (random weights)", "sha256": tensors_sha256(model.state_dict())}


def bench_model(spec: str, image: np.ndarray, args: argparse.Namespace) -> dict:
    from transformers import pipeline

    from slip.proposers.hf_tracker_generator import HfTrackerMaskGenerator
    from slip.proposers.hf_trackers import image_processor_of

    model, ref = load(spec)
    points = args.points_per_side or (6 if spec in (REAL_SIZE_EDGETAM, "edgetam", "sam3-tracker") else 12)
    ours = HfTrackerMaskGenerator(model, points_per_side=points, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                                  box_nms_thresh=args.nms, points_per_batch=64)
    theirs = pipeline("mask-generation", model=model, image_processor=image_processor_of(model), device="cpu")
    picture = Image.fromarray(image)

    def run_pipeline() -> dict:
        return theirs(picture, points_per_crop=points, points_per_batch=64, pred_iou_thresh=0.0,
                      stability_score_thresh=0.0, crops_nms_thresh=args.nms)

    def run_ours():
        stages: dict[str, float] = {}
        return ours.generate_masks(image, timings=stages), stages

    times: dict[str, list[float]] = {"pipeline": [], "ours": []}
    stages: list[dict] = []
    run_pipeline(), run_ours()  # warm-up, untimed
    for _ in range(args.repeats):
        start = time.perf_counter()
        reference = run_pipeline()
        times["pipeline"].append(time.perf_counter() - start)
        start = time.perf_counter()
        found, seconds = run_ours()
        times["ours"].append(time.perf_counter() - start)
        stages.append(seconds)
    masks = torch.stack(reference["masks"]) if reference["masks"] else torch.zeros((0, *image.shape[:2]), dtype=bool)
    same = len(found) == len(masks) and torch.equal(found.masks.cpu(), masks)
    summary = {k: _summary(v) for k, v in times.items()}
    return {
        "model": ref, "points_per_side": points, "masks": {"ours": len(found), "pipeline": len(masks)},
        "identical_masks_in_order": bool(same),
        "identical_scores": bool(same and torch.equal(found.predicted_iou.cpu(), reference["scores"])),
        "seconds_per_image": summary,
        "ours_stages_median_s": {k: statistics.median(s.get(k, 0.0) for s in stages) for k in stages[0]},
        "speedup": summary["pipeline"]["median"] / summary["ours"]["median"],
    }


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    image = scene(args.size)
    load_before = os.getloadavg()
    results = []
    for spec in args.models:
        result = bench_model(spec, image, args)
        t = result["seconds_per_image"]
        print(f"{spec:<26} pipeline {t['pipeline']['median']:.2f} s [{t['pipeline']['min']:.2f}, "
              f"{t['pipeline']['max']:.2f}]  ours {t['ours']['median']:.2f} s [{t['ours']['min']:.2f}, "
              f"{t['ours']['max']:.2f}]  x{result['speedup']:.2f}  masks {result['masks']['ours']} "
              f"identical={result['identical_masks_in_order']}", flush=True)
        results.append(result)
    doc = {
        "command": "python " + shlex.join(sys.argv), "image": f"{args.size}x{args.size} scene",
        "threads": args.threads, "repeats": args.repeats, "nms": args.nms, "device": "cpu",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "transformers": __import__("transformers").__version__,
                    "load_average_before_after": [load_before, os.getloadavg()]},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
