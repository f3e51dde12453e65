"""Segmentation benchmark: slip.MaskGenerator vs segment_anything's SamAutomaticMaskGenerator (SAM 1), and
slip's Sam2MaskGenerator vs the sam2 package's SAM2AutomaticMaskGenerator (SAM 2 / 2.1).

    python bench/segment.py --sam synth --scene mosaic --points-per-side 32 --thresholds 0
    python bench/segment.py --sam sam2.1-hiera-tiny --random-weights --points-per-side 16 --thresholds 0 --box-nms-thresh 1.0
    python bench/segment.py --sam synth --scene mosaic --threads 2 --hog 2     # busy machine: a CPU hog per core
    python bench/segment.py --sam vit_b --random-weights --points-per-side 16 --thresholds 0
    python bench/segment.py --sam vit_b --random-weights --points-per-side 16 --thresholds 0 --dtype bf16
    python bench/segment.py --agreement --sam synth --scenes 20            # bf16 vs fp32 masks
    python bench/segment.py --clip openai/clip-vit-base-patch32 ...         # + filters, crops and CLIP

Speed (the default): both generators get the same model, image and options. One untimed warm-up run
of each, then ``--repeats`` rounds of official, ours (interleaved: A, B, A, B, so that load from other
processes hits both alike); every figure is reported as median with min and max, and the per-image
ratio is the ratio of the medians. The machine's load average is recorded before and after. The last
round's outputs are compared record by record: mask count and order, masks (bit-identical, and the IoU
of each mask with its twin), boxes, predicted IoU and stability scores; with ``--dtype bf16|fp16`` ours
autocasts and the comparison is the agreement (mask count, mean best IoU of each fp32 mask).

``--agreement``: ours in ``--dtype`` against ours in fp32 (= the official masks) on ``--scenes`` demo
scenes (``producer.demo.demo_scene``, 256x256 2x2 composites) with the checkpoint's recommended options,
or, for ``--random-weights`` models, on generated scenes keeping fp32 masks with predicted IoU above
``--min-iou``: mask counts and the mean over fp32 masks of the best IoU among the reduced-precision masks.

``--hog N``: N processes spinning on a core each run beside both generators for the whole timed part (a busy
machine: the worker's CPU shared with other work); the load average is recorded before and after.

Stages: ``encode`` (image encoder), ``decode`` (prompt encoder + mask decoder), ``post`` (the rest:
upscaling, filters, NMS, RLE, records); official cut by forward hooks on SAM's modules, ours by its
``timings``. Random weights (``--random-weights``, when the checkpoint is missing) cost the same time
per forward pass as real ones, but their masks are noise. Writes JSON (with the exact command) to
``bench/results/`` (``--out``).
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this file's folder is sys.path[0], and bench/queue.py would shadow the standard
# `queue` module that torch imports: put the repository root in its place
_HERE, ROOT = Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from typing import Any, Iterator  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from segment_anything import SamAutomaticMaskGenerator  # noqa: E402

from slip.device import resolve_device  # noqa: E402
from slip.errors import SlipError, WeightsNotFoundError  # noqa: E402
from slip.generator import MaskGenerator  # noqa: E402
from slip.proposers.loading import load_proposer_model  # noqa: E402
from slip.proposers.sam2_generator import Sam2MaskGenerator  # noqa: E402
from slip.proposers.sam2_model import SAM2_ARCHS, TINY_SAM2, build_sam2  # noqa: E402
from slip.sam import OFFICIAL_TYPES, SAM_ARCHS, TINY_SPEC, build_sam  # noqa: E402
from slip.sam import recommended_generator_params  # noqa: E402

RANDOM_BANNER = "!" * 100


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sam", default="vit_b", help="SAM spec: vit_h | vit_l | vit_b | synth | tiny-random | "
                   "sam2.1-hiera-{tiny,small,base-plus,large} | tiny-random-sam2 | PATH")
    p.add_argument("--random-weights", action="store_true",
                   help="when weights are missing, time a RANDOMLY INITIALISED model of the same architecture")
    p.add_argument("--scene", default="generated", help="generated | mosaic (8x6 demo scenes) | PATH to an image")
    p.add_argument("--size", default="1024x768", help="WxH of a generated or mosaic scene, pixels")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (official, ours) after one warm-up")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--hog", type=int, default=0, help="CPU hogs (one spinning process per core) beside the runs")
    p.add_argument("--dtype", default="fp32", help="ours: fp32 | bf16 | fp16 (the official always runs fp32)")
    p.add_argument("--points-per-side", type=int, default=32)
    p.add_argument("--points-per-batch", type=int, default=64)
    p.add_argument("--thresholds", choices=["default", "0"], default="default",
                   help="0: pred_iou_thresh = stability_score_thresh = 0 (keeps every candidate)")
    p.add_argument("--box-nms-thresh", type=float, default=0.7)
    p.add_argument("--agreement", action="store_true", help="measure --dtype against fp32 instead of speed")
    p.add_argument("--scenes", type=int, default=20, help="--agreement: demo scenes (random weights: generated)")
    p.add_argument("--min-iou", type=float, default=0.3,
                   help="--agreement, random weights: keep fp32 masks with predicted IoU above this (-1: all)")
    p.add_argument("--clip", default=None,
                   help="ranker spec (openai/clip-vit-base-patch32, ...): also time filters, crops + CLIP")
    p.add_argument("--clip-max-masks", type=int, default=100, help="at most this many masks go to the CLIP stage")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default: bench/results/segment-<device>-<sam>-<scene>-<N>pts-<dtype>.json)")
    return p.parse_args()


# --- inputs -------------------------------------------------------------------------------------------------


def make_scene(width: int, height: int, seed: int = 0) -> np.ndarray:
    """``(H, W, 3) uint8``: a shaded background with rectangles, discs and stripes in several colours."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    image = np.stack([60 + 40 * xx / width, 80 + 30 * yy / height, 70 + 20 * (xx + yy) / (width + height)], -1)
    for _ in range(14):
        colour = rng.integers(0, 256, 3)
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.04, 0.15) * min(width, height)
        if rng.random() < 0.5:
            image[(xx - cx) ** 2 + (yy - cy) ** 2 < r**2] = colour
        else:
            image[(abs(xx - cx) < r * 1.4) & (abs(yy - cy) < r * 0.8)] = colour
    image[((yy.astype(int) // 24) % 2 == 0) & (xx < width // 6)] *= 0.8  # stripes on the left
    image += rng.normal(0, 4, image.shape)  # sensor noise
    return np.clip(image, 0, 255).astype(np.uint8)


def mosaic(width: int, height: int, columns: int = 8, rows: int = 6) -> np.ndarray:
    """``(H, W, 3) uint8``: ``columns x rows`` demo scenes (4 synthetic objects each), resized to the size."""
    from PIL import Image

    from producer.demo import demo_scene

    tiles = [demo_scene(i)[0] for i in range(columns * rows)]
    grid = np.concatenate([np.concatenate(tiles[r * columns : (r + 1) * columns], 1) for r in range(rows)], 0)
    return np.asarray(Image.fromarray(grid).resize((width, height), Image.BILINEAR))


def load_scene(args: argparse.Namespace) -> np.ndarray:
    width, height = (int(v) for v in args.size.lower().split("x"))
    if args.scene == "generated":
        return make_scene(width, height)
    if args.scene == "mosaic":
        return mosaic(width, height)
    from slip.images import load_image

    return load_image(Path(args.scene))


def load_model(args: argparse.Namespace, device: torch.device) -> tuple[Any, str]:
    """The SAM (1 or 2) for ``--sam`` and ``"real"`` / ``"random"``; random only with ``--random-weights``."""
    cache_dir = Path(os.environ["SLIP_CACHE"]) if os.environ.get("SLIP_CACHE") else None
    try:
        model = load_proposer_model(args.sam, device=device, cache_dir=cache_dir).model
        return model, "random" if args.sam in (TINY_SPEC, TINY_SAM2) else "real"
    except WeightsNotFoundError as e:
        if not (args.random_weights and (args.sam in OFFICIAL_TYPES or args.sam in SAM2_ARCHS)):
            sys.exit(f"error: {e}\n(add --random-weights to time a randomly initialised {args.sam} instead)")
        print(f"{RANDOM_BANNER}\n!!! {e}\n!!! RANDOM WEIGHTS: timing a randomly initialised {args.sam}. "
              f"Only the timings are meaningful;\n!!! the masks and scores are noise.\n{RANDOM_BANNER}")
        torch.manual_seed(0)
        built = build_sam2(SAM2_ARCHS[args.sam]) if args.sam in SAM2_ARCHS else build_sam(SAM_ARCHS[args.sam])
        return built.to(device).eval(), "random"


def is_sam2(model) -> bool:
    from sam2.modeling.sam2_base import SAM2Base

    return isinstance(model, SAM2Base)


def generators(model, options: dict, dtype: str):
    """(official, ours) automatic mask generators of the model's family."""
    if is_sam2(model):
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

        return SAM2AutomaticMaskGenerator(model, **options), Sam2MaskGenerator(model, dtype=dtype, **options)
    return SamAutomaticMaskGenerator(model, **options), MaskGenerator(model, dtype=dtype, **options)


@contextmanager
def cpu_hogs(count: int) -> Iterator[list[int]]:
    """``count`` processes spinning on the CPU (pure Python busy loops) for the duration; their pids."""
    import subprocess

    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(1.0 if procs else 0.0)  # let them take their cores
        yield [p.pid for p in procs]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def generator_options(args: argparse.Namespace) -> dict:
    return {
        "points_per_side": args.points_per_side, "points_per_batch": args.points_per_batch,
        "box_nms_thresh": args.box_nms_thresh,
        **({"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0} if args.thresholds == "0" else {}),
    }


# --- timing ------------------------------------------------------------------------------------------------


class StageClock:
    """Seconds inside SAM's image encoder and prompt encoder + mask decoder (the official generator's
    stages), via forward hooks."""

    def __init__(self, sam, device: torch.device) -> None:
        self.device, self.seconds, self._start = device, {"encode": 0.0, "decode": 0.0}, 0.0
        if is_sam2(sam):
            stages = {sam.image_encoder: "encode", sam.sam_prompt_encoder: "decode", sam.sam_mask_decoder: "decode"}
        else:
            stages = {sam.image_encoder: "encode", sam.prompt_encoder: "decode", sam.mask_decoder: "decode"}
        self._handles = [h for m, stage in stages.items() for h in self._hook(m, stage)]

    def _hook(self, module: torch.nn.Module, stage: str) -> list:
        def before(*_):
            _sync(self.device)
            self._start = time.perf_counter()

        def after(*_):
            _sync(self.device)
            self.seconds[stage] += time.perf_counter() - self._start

        return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_official(generator, sam, image, device) -> tuple[list[dict], dict]:
    clock = StageClock(sam, device)
    start = time.perf_counter()
    records = generator.generate(image)
    _sync(device)
    total = time.perf_counter() - start
    clock.remove()
    return records, {"total": total, **clock.seconds, "post": total - sum(clock.seconds.values())}


def run_ours(generator: MaskGenerator, image, device) -> tuple[list[dict], dict]:
    timings: dict[str, float] = {}
    start = time.perf_counter()
    records = generator.generate(image, timings=timings)
    _sync(device)
    total = time.perf_counter() - start
    encode, decode = timings.get("encode", 0.0), timings.get("decode", 0.0)
    return records, {"total": total, "encode": encode, "decode": decode, "post": total - encode - decode}


def summary(runs: list[dict]) -> dict:
    """Median, min and max of each stage over the runs, and the raw totals."""
    out = {key: {"median": statistics.median(r[key] for r in runs), "min": min(r[key] for r in runs),
                 "max": max(r[key] for r in runs)} for key in runs[0]}
    return out | {"runs": [round(r["total"], 3) for r in runs]}


# --- comparison ------------------------------------------------------------------------------------------------


def best_iou(reference: np.ndarray, other: np.ndarray, chunk: int = 64) -> np.ndarray:
    """For each ``(N, H, W)`` bool reference mask, the best IoU among the ``(M, H, W)`` other masks
    (``(N,)``; 0 when ``other`` is empty; 1 for two empty masks)."""
    if len(other) == 0 or len(reference) == 0:
        return np.zeros(len(reference))
    b = torch.from_numpy(other).flatten(1).float()  # exact: counts stay below 2**24
    b_area = b.sum(1)
    best = np.zeros(len(reference))
    for start in range(0, len(reference), chunk):
        part = torch.from_numpy(reference[start : start + chunk]).flatten(1).float()
        inter = part @ b.T
        union = part.sum(1, keepdim=True) + b_area - inter
        best[start : start + chunk] = torch.where(union > 0, inter / union.clamp(min=1), 1.0).amax(1).numpy()
    return best


def compare(official: list[dict], ours: list[dict], exact: bool) -> dict:
    """Record-by-record agreement of ours with the official records (see the module docstring)."""
    real = int(sum(r["area"] > 0 for r in official))
    out: dict = {"official": len(official), "ours": len(ours), "official_real_masks": real,
                 "ours_real_masks": int(sum(r["area"] > 0 for r in ours))}
    ref = np.stack([r["segmentation"] for r in official]) if official else np.zeros((0, 1, 1), bool)
    mine = np.stack([r["segmentation"] for r in ours]) if ours else np.zeros((0, 1, 1), bool)
    if exact and len(official) == len(ours):
        inter = (ref & mine).reshape(len(ref), -1).sum(1)
        union = (ref | mine).reshape(len(ref), -1).sum(1)
        twin_iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
        iou_gap = [abs(a["predicted_iou"] - b["predicted_iou"]) for a, b in zip(official, ours)]
        stab_gap = [abs(np.nan_to_num(a["stability_score"]) - np.nan_to_num(b["stability_score"]))
                    for a, b in zip(official, ours)]
        out |= {
            "identical_masks": int(sum(np.array_equal(x, y) for x, y in zip(ref, mine))),
            "min_twin_iou": float(twin_iou.min()) if len(twin_iou) else 1.0,
            "equal_boxes": int(sum(a["bbox"] == b["bbox"] for a, b in zip(official, ours))),
            "max_predicted_iou_gap": float(max(iou_gap, default=0.0)),
            "max_stability_gap": float(max(stab_gap, default=0.0)),
        }
        out["same"] = bool((out["identical_masks"] == len(ref) or out["min_twin_iou"] >= 0.999)
                           and out["equal_boxes"] == len(ref)
                           and max(out["max_predicted_iou_gap"], out["max_stability_gap"]) <= 1e-4)
    elif exact:
        out["same"] = False
    if not exact:
        out["mean_best_iou"] = float(best_iou(ref, mine).mean()) if len(ref) else None
        out["count_ratio"] = len(ours) / max(len(official), 1)
    return out


# --- the cases -------------------------------------------------------------------------------------------------


def bench_speed(args, sam, image, device) -> dict:
    options = generator_options(args)
    official, ours = generators(sam, options, args.dtype)
    # warm-up (allocator, thread pools, the window upscaler's one-off check), then A, B, A, B
    run_official(official, sam, image, device)
    run_ours(ours, image, device)
    official_runs, ours_runs = [], []
    for i in range(args.repeats):
        official_records, timing = run_official(official, sam, image, device)
        official_runs.append(timing)
        ours_records, timing = run_ours(ours, image, device)
        ours_runs.append(timing)
        print(f"round {i + 1}: official {official_runs[-1]['total']:.2f} s, ours {ours_runs[-1]['total']:.2f} s")
    official_t, ours_t = summary(official_runs), summary(ours_runs)
    result = {
        "options": options, "dtype": args.dtype, "official": official_t, "ours": ours_t,
        "speedup": official_t["total"]["median"] / ours_t["total"]["median"],
        "speedup_range": [official_t["total"]["min"] / ours_t["total"]["max"],
                          official_t["total"]["max"] / ours_t["total"]["min"]],
        "masks": compare(official_records, ours_records, exact=args.dtype == "fp32"),
    }
    if args.clip:
        cache_dir = Path(os.environ["SLIP_CACHE"]) if os.environ.get("SLIP_CACHE") else None
        result["clip_stage"] = bench_clip(image, ours.generate_masks(image), device, args, cache_dir)
    return result


def bench_agreement(args, sam, weights: str, device) -> dict:
    """``--dtype`` vs fp32 masks of ours over several scenes."""
    from producer.demo import demo_scene

    if weights == "random":
        options = generator_options(args)
        width, height = (int(v) for v in args.size.lower().split("x"))
        images = [make_scene(width, height, seed) for seed in range(args.scenes)]
    else:
        options = recommended_generator_params(args.sam)
        images = [demo_scene(i)[0] for i in range(args.scenes)]
    (_, fp32), (_, reduced) = generators(sam, options, "fp32"), generators(sam, options, args.dtype)
    per_scene = []
    for i, image in enumerate(images):
        start = time.perf_counter()
        a, b = fp32.generate_masks(image), reduced.generate_masks(image)
        quantiles = np.quantile(a.predicted_iou.cpu().numpy(), [0, 0.5, 1]).round(3).tolist() if len(a) else []
        if weights == "random":  # noise masks: keep the candidates the model itself rates
            a = a.select(a.predicted_iou > args.min_iou)
        best = best_iou(a.masks.cpu().numpy(), b.masks.cpu().numpy())
        per_scene.append({"fp32": len(a), args.dtype: len(b), "mean_best_iou": float(best.mean()) if len(a) else None,
                          "best_iou_below_0.9": int((best < 0.9).sum()), "fp32_predicted_iou_min_median_max": quantiles})
        print(f"scene {i}: {per_scene[-1]} ({time.perf_counter() - start:.1f} s)")
    scored = [s for s in per_scene if s["mean_best_iou"] is not None]
    total_fp32 = sum(s["fp32"] for s in per_scene)
    return {
        "options": options, "dtype": args.dtype, "scenes": len(images),
        "scene_kind": "generated" if weights == "random" else "producer.demo.demo_scene",
        "masks_fp32": total_fp32, f"masks_{args.dtype}": sum(s[args.dtype] for s in per_scene),
        "mean_best_iou": sum(s["mean_best_iou"] * s["fp32"] for s in scored) / total_fp32 if total_fp32 else None,
        "per_scene": per_scene,
    }


@contextmanager
def stopwatch(device: torch.device, out: dict, key: str) -> Iterator[None]:
    """Keeps the best (smallest) time of ``key`` in ``out``."""
    start = time.perf_counter()
    yield
    _sync(device)
    out[key] = min(out.get(key, float("inf")), time.perf_counter() - start)


def load_clip(args, device: torch.device, cache_dir: Path | None):
    """The ranker for ``--clip`` and ``"real"`` / ``"random"``; ``None`` when slip's CLIP parts are missing."""
    try:
        from slip.rankers.hf_clip import HFClipRanker, tiny_tokenizer
        from slip.rankers.loading import load_ranker
    except ImportError as e:
        print(f"CLIP stage skipped: slip's ranker API is not there yet ({e})")
        return None, None
    try:
        ranker = load_ranker(args.clip, device=device, cache_dir=cache_dir)
        return ranker, "random" if args.clip == "tiny-random" else "real"
    except WeightsNotFoundError as e:
        if not args.random_weights:
            sys.exit(f"error: {e}\n(add --random-weights to time a randomly initialised CLIP, or --no-clip)")
        from transformers import CLIPConfig, CLIPModel

        print(f"{RANDOM_BANNER}\n!!! {e}\n!!! RANDOM WEIGHTS: timing a randomly initialised CLIP ViT-B/32 "
              f"(224 px). Only the timings are meaningful.\n{RANDOM_BANNER}")
        torch.manual_seed(0)
        model = CLIPModel(CLIPConfig()).eval()  # CLIPConfig() defaults are ViT-B/32's shapes
        return HFClipRanker(model, tiny_tokenizer(), spec="random ViT-B/32", device=device), "random"


def peer_clip_loop(image: np.ndarray, masks: np.ndarray, boxes_xyxy: np.ndarray, model, device
                   ) -> tuple[float, float]:
    """Seconds for crops and for CLIP, one mask at a time, as SAM+CLIP notebooks do it."""
    from PIL import Image
    from transformers import CLIPImageProcessor

    side = int(model.config.vision_config.image_size)
    # OpenAI CLIP preprocessing: resize the short side, centre crop, normalise
    processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    crops_s = clip_s = 0.0
    with torch.inference_mode():
        for mask, (x0, y0, x1, y1) in zip(masks, boxes_xyxy.astype(int)):
            start = time.perf_counter()
            segmented = np.zeros_like(image)
            segmented[mask] = image[mask]
            crop = Image.fromarray(segmented).crop((x0, y0, x1 + 1, y1 + 1))
            pixels = processor(images=crop, return_tensors="pt")["pixel_values"].to(device)
            crops_s += time.perf_counter() - start
            start = time.perf_counter()
            features = model.get_image_features(pixel_values=pixels)
            features = getattr(features, "pooler_output", features)
            torch.nn.functional.normalize(features.float(), dim=-1).cpu()
            clip_s += time.perf_counter() - start
    return crops_s, clip_s


def bench_clip(image: np.ndarray, found, device: torch.device, args, cache_dir) -> dict | None:
    """Filters, then crops + CLIP: ``slip.crop_segments`` + batched ``encode_images`` (ours) vs, per mask,
    numpy black-out + PIL crop + ``CLIPImageProcessor`` + one CLIP forward (the peer loop)."""
    try:
        from slip.crops import CropConfig, crop_segments
        from slip.filters import apply_filters, default_filters
    except ImportError as e:
        print(f"filters / crops / CLIP stages skipped: slip's API is not there yet ({e})")
        return None
    ranker, weights = load_clip(args, device, cache_dir)
    if ranker is None:
        return None
    out: dict = {"clip": getattr(ranker, "spec", args.clip), "clip_weights": weights}
    for _ in range(args.repeats):
        with stopwatch(device, out, "filters"):
            kept, _ = apply_filters(found, default_filters())
    out["masks_after_filters"] = len(kept)
    subset = found.select(torch.arange(min(len(found), args.clip_max_masks), device=found.masks.device))
    out["masks_embedded"] = len(subset)
    if not len(subset):
        return out
    ranker.encode_images(crop_segments(image, subset, CropConfig(), ranker.image_size))  # warm-up
    for _ in range(args.repeats):
        with stopwatch(device, out, "ours_crops"):
            pixels = crop_segments(image, subset, CropConfig(), ranker.image_size)
        with stopwatch(device, out, "ours_clip"):
            ranker.encode_images(pixels).cpu()
    if not hasattr(ranker, "model"):
        print(f"peer CLIP loop skipped: ranker {out['clip']} is not a Hugging Face CLIP model")
        return out
    masks, boxes = subset.masks.cpu().numpy(), subset.boxes.cpu().numpy()
    peer = [peer_clip_loop(image, masks, boxes, ranker.model, device) for _ in range(args.repeats)]
    out["peer_crops"], out["peer_clip"] = min(p[0] for p in peer), min(p[1] for p in peer)
    out["speedup_crops_plus_clip"] = (out["peer_crops"] + out["peer_clip"]) / (out["ours_crops"] + out["ours_clip"])
    return out


# --- report ------------------------------------------------------------------------------------------------


def print_speed(result: dict) -> None:
    print(f"\n{'generator':<12}{'total s (median [min, max])':>32}{'encode':>9}{'decode':>9}{'post':>9}")
    for key in ("official", "ours"):
        r = result[key]
        t = r["total"]
        print(f"{key:<12}{t['median']:>14.2f} [{t['min']:.2f}, {t['max']:.2f}]{'':>4}"
              f"{r['encode']['median']:>9.2f}{r['decode']['median']:>9.2f}{r['post']['median']:>9.2f}")
    lo, hi = result["speedup_range"]
    print(f"speed-up (median / median): x{result['speedup']:.2f} (worst..best pairing x{lo:.2f}..x{hi:.2f})")
    print(f"masks: {_json(result['masks'], None)}")


def _json(data: Any, indent: int | None) -> str:
    """JSON text; numpy scalars become Python numbers."""
    return json.dumps(data, indent=indent, default=lambda o: o.item() if hasattr(o, "item") else str(o))


def main() -> None:
    args = parse_args()
    load_before = os.getloadavg()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
        sam, weights = load_model(args, device)
        image = None if args.agreement else load_scene(args)
    except (SlipError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"{args.sam} ({weights} weights) on {device}, {torch.get_num_threads()} thread(s), load {load_before}")
    with torch.inference_mode(), cpu_hogs(args.hog) as hogs:
        if args.agreement:
            result = bench_agreement(args, sam, weights, device)
        else:
            result = bench_speed(args, sam, image, device)
        load_during = os.getloadavg()
    if not args.agreement:
        print_speed(result)
    else:
        print(_json({k: v for k, v in result.items() if k != "per_scene"}, 1))
    scene = Path(args.scene).stem if args.scene not in ("generated", "mosaic") else args.scene
    sam_name = Path(args.sam).name
    case = f"agreement-{sam_name}" if args.agreement else f"{sam_name}-{scene}-{args.points_per_side}pts"
    case += f"-{torch.get_num_threads()}threads-hog{args.hog}" if args.hog else ""
    record = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "sam": args.sam, "sam_weights": weights, "device": str(device),
        "image": None if image is None else f"{args.scene} {image.shape[1]}x{image.shape[0]}",
        "repeats": args.repeats, "threads": torch.get_num_threads(),
        "load_average": {"before": load_before, "end_of_runs": load_during, "after": os.getloadavg()},
        "cpu_count": os.cpu_count(), "hogs": len(hogs),
        "torch": torch.__version__, "python": platform.python_version(), "result": result,
    }
    out = args.out or ROOT / "bench" / "results" / f"segment-{device.type}-{case}-{args.dtype}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_json(record, 2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
