"""Segmentation benchmark: slip.MaskGenerator vs segment_anything's SamAutomaticMaskGenerator, and
batched crops + CLIP vs the per-crop CLIP loop of typical SAM+CLIP projects.

    python bench/segment.py [--sam vit_b] [--random-weights] [--image PATH] [--repeats 3] [--device auto]
                            [--points-per-side 32] [--thresholds 0] [--clip SPEC] [--no-clip]

Both generators run the same model on the same image with the same options, one after the other, in
one process; each figure is the best of ``--repeats`` runs (on a shared machine other load only ever
slows a run down). The ratio ``official / ours`` is taken within this one run. The benchmark also
checks that both generators return the same masks in the same order.

Stages (forward hooks on SAM's modules, so both generators are cut the same way):

* ``encode`` — the image encoder; ``decode`` — prompt encoder + mask decoder;
* ``post`` — everything else: upscaling, score filters, NMS, RLE encoding / decoding, records;
* ``filters`` — slip's default annotation filters on our masks (no official counterpart);
* ``crops`` + ``clip`` — ours: ``slip.crop_segments`` then ``ranker.encode_images`` in batches; the
  peer loop: for each mask, black out the background with numpy, crop the box with PIL, run the CLIP
  processor and the CLIP image tower on that one crop. Same CLIP weights, same masks.

Weights: ``--sam vit_b`` needs the official checkpoint in the weights cache (``$SLIP_CACHE``; ``slip
weights fetch vit_b``). Without it the script stops, unless ``--random-weights`` is given: then a
randomly initialised model of the same architecture is used (and likewise a random ViT-B/32 CLIP when
the CLIP weights are missing), which costs the same time per image as the real one — timings are
meaningful, the masks are not. Random weights make SAM's scores low and its masks near-identical, so
the default thresholds may keep nothing: ``--thresholds 0`` switches both score filters off, and the
mask counts of both generators are reported.

Prints a table and writes everything as JSON to ``bench/results/segment-<device>.json``.
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
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from typing import Any, Callable, Iterator  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from segment_anything import SamAutomaticMaskGenerator  # noqa: E402

from slip.device import resolve_device  # noqa: E402
from slip.errors import SlipError, WeightsNotFoundError  # noqa: E402
from slip.generator import MaskGenerator  # noqa: E402
from slip.sam import OFFICIAL_TYPES, SAM_ARCHS, TINY_SPEC, build_sam, load_sam  # noqa: E402
from slip.types import MaskSet  # noqa: E402

RANDOM_BANNER = "!" * 100


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sam", default="vit_b", help="SAM spec: vit_h | vit_l | vit_b | synth | tiny-random | PATH")
    p.add_argument("--random-weights", action="store_true",
                   help="when weights are missing, time a RANDOMLY INITIALISED model of the same architecture")
    p.add_argument("--image", type=Path, default=None, help="image file (default: a generated scene)")
    p.add_argument("--size", default="1024x768", help="WxH of the generated scene, pixels")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant; the best is reported")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default: 1 on GPU, 0 on CPU)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--points-per-side", type=int, default=32)
    p.add_argument("--points-per-batch", type=int, default=64)
    p.add_argument("--thresholds", choices=["default", "0"], default="default",
                   help="0: pred_iou_thresh = stability_score_thresh = 0 (keeps masks of random weights)")
    p.add_argument("--box-nms-thresh", type=float, default=0.7)
    p.add_argument("--clip", default="openai/clip-vit-base-patch32", help="ranker spec for the CLIP stage")
    p.add_argument("--no-clip", action="store_true", help="skip the filters, crops and CLIP stages")
    p.add_argument("--clip-max-masks", type=int, default=100, help="at most this many masks go to the CLIP stage")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: bench/results/segment-<device>.json)")
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


def load_models(args: argparse.Namespace, device: torch.device, cache_dir: Path | None) -> tuple[Any, str]:
    """The SAM for ``--sam`` and ``"real"`` / ``"random"``; random only with ``--random-weights``."""
    try:
        sam = load_sam(args.sam, device=device, cache_dir=cache_dir)
        return sam, "random" if args.sam == TINY_SPEC else "real"
    except WeightsNotFoundError as e:
        if not (args.random_weights and args.sam in OFFICIAL_TYPES):
            sys.exit(f"error: {e}\n(add --random-weights to time a randomly initialised {args.sam} instead)")
        print(f"{RANDOM_BANNER}\n!!! {e}\n!!! RANDOM WEIGHTS: timing a randomly initialised {args.sam}. "
              f"Only the timings are meaningful;\n!!! the masks and scores are noise.\n{RANDOM_BANNER}")
        torch.manual_seed(0)
        return build_sam(SAM_ARCHS[args.sam]).to(device).eval(), "random"


# --- timing ------------------------------------------------------------------------------------------------


class StageClock:
    """Seconds spent inside SAM's image encoder and prompt encoder + mask decoder, via forward hooks."""

    def __init__(self, sam, device: torch.device) -> None:
        self.device, self.seconds, self._start = device, {"encode": 0.0, "decode": 0.0}, 0.0
        stages = {sam.image_encoder: "encode", sam.prompt_encoder: "decode", sam.mask_decoder: "decode"}
        self._handles = [h for m, stage in stages.items() for h in self._hook(m, stage)]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _hook(self, module: torch.nn.Module, stage: str) -> list:
        def before(*_):
            self._sync()
            self._start = time.perf_counter()

        def after(*_):
            self._sync()
            self.seconds[stage] += time.perf_counter() - self._start

        return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def timed(fn: Callable[[], Any], sam, device: torch.device, repeats: int, warmup: int) -> tuple[Any, dict]:
    """Run ``fn`` ``warmup`` + ``repeats`` times; the result of the last run and the best run's stages."""
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        clock = StageClock(sam, device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        total = time.perf_counter() - start
        clock.remove()
        runs.append({"total": total, **clock.seconds, "post": total - sum(clock.seconds.values())})
    best = min(runs, key=lambda r: r["total"])
    return result, {**best, "runs": [round(r["total"], 4) for r in runs], "images_per_s": 1.0 / best["total"]}


@contextmanager
def stopwatch(device: torch.device, out: dict, key: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out[key] = min(out.get(key, float("inf")), time.perf_counter() - start)


# --- the generator comparison ------------------------------------------------------------------------------


def same_masks(records: list[dict], found: MaskSet) -> bool:
    if len(records) != len(found):
        return False
    masks = found.masks.cpu().numpy()
    return all(np.array_equal(r["segmentation"], m) for r, m in zip(records, masks))


def bench_generators(sam, image: np.ndarray, options: dict, device: torch.device, args) -> tuple[dict, MaskSet]:
    ours, official = MaskGenerator(sam, **options), SamAutomaticMaskGenerator(sam, **options)
    warmup = args.warmup if args.warmup is not None else int(device.type == "cuda")
    records, official_t = timed(lambda: official.generate(image), sam, device, args.repeats, warmup)
    ours_records, ours_t = timed(lambda: ours.generate(image), sam, device, args.repeats, warmup)
    found, masks_t = timed(lambda: ours.generate_masks(image), sam, device, args.repeats, warmup)
    result = {
        "official_generate": official_t,
        "ours_generate": ours_t,
        "ours_generate_masks": masks_t,
        "masks": {"official": len(records), "ours": len(ours_records), "identical": same_masks(records, found)},
        "speedup_generate": official_t["total"] / ours_t["total"],
        "speedup_generate_masks": official_t["total"] / masks_t["total"],
        "speedup_post": official_t["post"] / max(masks_t["post"], 1e-9),
    }
    return result, found


# --- the CLIP comparison -----------------------------------------------------------------------------------


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


def bench_clip(image: np.ndarray, found: MaskSet, device: torch.device, args, cache_dir) -> dict | None:
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


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return "cuda-" + torch.cuda.get_device_name(device).lower().replace(" ", "-")
    return device.type


def print_table(gen: dict, clip: dict | None) -> None:
    print(f"\n{'variant':<24}{'total s':>10}{'img/s':>9}{'encode':>9}{'decode':>9}{'post':>9}   runs")
    for key in ("official_generate", "ours_generate", "ours_generate_masks"):
        r = gen[key]
        print(f"{key:<24}{r['total']:>10.3f}{r['images_per_s']:>9.3f}{r['encode']:>9.3f}{r['decode']:>9.3f}"
              f"{r['post']:>9.3f}   {r['runs']}")
    m = gen["masks"]
    print(f"masks: official {m['official']}, ours {m['ours']}, identical: {m['identical']}")
    print(f"speed-up official/ours: generate x{gen['speedup_generate']:.2f}, generate_masks "
          f"x{gen['speedup_generate_masks']:.2f}, post-processing x{gen['speedup_post']:.1f}")
    if clip:
        print(f"filters {clip.get('filters', 0):.3f} s -> {clip.get('masks_after_filters')} masks; "
              f"CLIP stage on {clip.get('masks_embedded')} masks ({clip['clip']}, {clip['clip_weights']} weights):")
        if "ours_crops" in clip:
            print(f"  ours (batched): crops {clip['ours_crops']:.3f} s, clip {clip['ours_clip']:.3f} s")
        if "peer_crops" in clip:
            print(f"  peer (per crop, PIL + CLIPImageProcessor): crops {clip['peer_crops']:.3f} s, "
                  f"clip {clip['peer_clip']:.3f} s -> speed-up x{clip['speedup_crops_plus_clip']:.2f}")


def main() -> None:
    args = parse_args()
    load_at_start = os.getloadavg()
    if args.threads:
        torch.set_num_threads(args.threads)
    cache_dir = Path(os.environ["SLIP_CACHE"]) if os.environ.get("SLIP_CACHE") else None
    try:
        device = resolve_device(args.device)
        width, height = (int(v) for v in args.size.lower().split("x"))
        if args.image is not None:
            from slip.images import load_image

            image = load_image(args.image)
        else:
            image = make_scene(width, height)
        sam, sam_weights = load_models(args, device, cache_dir)
    except (SlipError, ValueError) as e:
        sys.exit(f"error: {e}")
    options = {
        "points_per_side": args.points_per_side,
        "points_per_batch": args.points_per_batch,
        "box_nms_thresh": args.box_nms_thresh,
        **({"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0} if args.thresholds == "0" else {}),
    }
    print(f"{args.sam} ({sam_weights} weights) on {device_name(device)}, image {image.shape[1]}x{image.shape[0]}, "
          f"options {options}, {args.repeats} repeat(s), {torch.get_num_threads()} thread(s)")
    gen, found = bench_generators(sam, image, options, device, args)
    clip = None if args.no_clip else bench_clip(image, found, device, args, cache_dir)
    print_table(gen, clip)
    result = {
        "sam": args.sam, "sam_weights": sam_weights, "device": device_name(device),
        "image": str(args.image) if args.image else f"generated {image.shape[1]}x{image.shape[0]}",
        "options": options, "repeats": args.repeats, "threads": torch.get_num_threads(),
        "load_average": {"start": load_at_start, "end": os.getloadavg()},
        "torch": torch.__version__, "python": platform.python_version(),
        "generator": gen, "clip_stage": clip,
    }
    out = args.out or ROOT / "bench" / "results" / f"segment-{device_name(device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
