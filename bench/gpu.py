"""One-shot GPU benchmark (run by ``bash bench/gpu.sh``): SAM generators, CLIP ranking and the queue, on one CUDA GPU.

    bash bench/gpu.sh                 # on a machine with a CUDA GPU: about 5-8 minutes
    bash bench/gpu.sh --dry-run       # on any CPU: tiny models, the same code paths, about a minute

Measured (random weights of the real architectures; weights do not change the cost of a forward pass):

1. ``sam``: the official ``SamAutomaticMaskGenerator`` vs ours (``slip.MaskGenerator``) in fp32, bf16 and,
   when it helps, bf16 with ``torch.compile`` of the image encoder — vit_b and vit_h, SAM's default 32x32
   grid, a 1024x768 image, score thresholds 0 (every candidate post-processed). Warm-up first, then the
   variants interleaved (A, B, C, D, A, B, ...), ``--repeats`` times; medians with min/max; the masks of
   ours fp32 are compared with the official ones (count, mean best IoU), bf16 with fp32.
2. ``clip``: a ViT-B/32-sized CLIP ranking 150 segment crops (crops + image encoder), fp32 and bf16.
3. ``sam2``: SAM 2.1-L's automatic mask generation (random weights), the official ``SAM2AutomaticMaskGenerator``
   vs ours (``Sam2MaskGenerator``), each in fp32 and bf16 (the official under ``torch.autocast``), per image;
   ours fp32 compared with the official's masks, bf16 with fp32.
4. ``sam3``: the SAM 3 engine (real-size random ``Sam3Model``) per image with 1 and 8 prompts, fp32 and bf16,
   each a first pass (vision features computed), and a new prompt on an image already seen (features cached).
5. ``queue``: one end-to-end run through the real queue: a private ``redis-server``, one
   ``celery -A worker worker`` on the GPU (vit_h + ViT-B/32, bf16), ``--queue-images`` 1024x768 JPEGs
   submitted with ``slip submit segment``: milliseconds per image from submit to the last result.

Writes ``bench/results/gpu-<name>.json`` per case (``gpu-dryrun-*`` for a dry run) and prints a table.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402


# --- cases -------------------------------------------------------------------------------------------------


def scene(height: int, width: int) -> np.ndarray:
    """A 2x2 mosaic of synthetic objects on textured backgrounds, resized to ``height x width``."""
    from PIL import Image

    from producer.demo import demo_scene

    tiles = [demo_scene(i)[0] for i in range(4)]
    mosaic = np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)
    return np.asarray(Image.fromarray(mosaic).resize((width, height)))


def sam_case(arch: str, args, device: torch.device) -> dict:
    """Official vs ours (fp32, bf16, bf16 + compile) on one random-weight SAM."""
    from segment_anything import SamAutomaticMaskGenerator

    from slip.generator import MaskGenerator
    from slip.sam import SAM_ARCHS, build_sam

    torch.manual_seed(0)
    sam = build_sam(SAM_ARCHS[arch]).to(device).eval()
    image = scene(*args.image_size)
    options = dict(points_per_side=args.points_per_side, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    variants = {
        "official_fp32": SamAutomaticMaskGenerator(sam, **options).generate,
        "ours_fp32": MaskGenerator(sam, **options).generate_masks,
        "ours_bf16": MaskGenerator(sam, dtype="bf16", **options).generate_masks,
    }
    if device.type == "cuda" and not args.no_compile:
        compiled = MaskGenerator(sam, dtype="bf16", **options)
        compiled.sam.image_encoder = torch.compile(sam.image_encoder)  # the same weights, a compiled forward
        variants["ours_bf16_compile"] = compiled.generate_masks
    timings = interleaved(variants, image, repeats=args.repeats, device=device)
    if "ours_bf16_compile" in variants:
        sam.image_encoder = getattr(sam.image_encoder, "_orig_mod", sam.image_encoder)
    official = official_masks(variants["official_fp32"](image), device)
    ours = variants["ours_fp32"](image).masks
    half = variants["ours_bf16"](image).masks
    return {"arch": arch, "image": list(args.image_size), "options": options, "timings_s": timings,
            "ratio_official_over": {k: timings["official_fp32"]["median"] / v["median"] for k, v in timings.items()},
            "agreement": {"ours_fp32_vs_official": agreement(official, ours),
                          "ours_bf16_vs_ours_fp32": agreement(ours, half)}}


def clip_case(args, device: torch.device) -> dict:
    """A ViT-B/32-sized CLIP embedding ``args.crops`` segment crops, fp32 and bf16."""
    from transformers import CLIPConfig, CLIPModel

    from slip.crops import CropConfig, crop_segments
    from slip.data.dataset import maskset_from_masks
    from slip.rankers.hf_clip import HFClipRanker, tiny_tokenizer

    config = CLIPConfig() if not args.dry_run else CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=32)
    image = scene(*args.image_size)
    rng = np.random.default_rng(0)
    masks = np.zeros((args.crops, *image.shape[:2]), bool)
    for m in masks:  # boxes of random sizes and places, as SAM's segments would be
        y, x = rng.integers(0, image.shape[0] // 2), rng.integers(0, image.shape[1] // 2)
        m[y : y + rng.integers(20, image.shape[0] // 2), x : x + rng.integers(20, image.shape[1] // 2)] = True
    segments = maskset_from_masks(torch.from_numpy(masks).to(device))
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        ranker = HFClipRanker(CLIPModel(config), tiny_tokenizer(), spec="random-vit-b-32", device=device, dtype=dtype)

        def run() -> None:
            ranker.encode_images(crop_segments(image, segments, CropConfig(), ranker.image_size))

        out[str(dtype).split(".")[-1]] = interleaved({"rank": lambda _: run()}, image, repeats=args.repeats,
                                                     device=device)["rank"]
    return {"crops": args.crops, "model": "ViT-B/32 (random)" if not args.dry_run else "tiny", "timings_s": out}


def sam2_case(args, device: torch.device) -> dict:
    """SAM 2.1 AMG: official vs ours, fp32 and bf16, on one random-weight model."""
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    from slip.proposers.sam2_generator import Sam2MaskGenerator
    from slip.proposers.sam2_model import SAM2_ARCHS, build_sam2

    name = "tiny-random-sam2" if args.dry_run else "sam2.1-hiera-large"
    torch.manual_seed(0)
    model = build_sam2(SAM2_ARCHS[name]).to(device).eval()
    image = scene(*args.image_size)
    options = dict(points_per_side=args.points_per_side, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    official = SAM2AutomaticMaskGenerator(model, **options)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731

    def official_bf16(im):
        with autocast():
            return official.generate(im)

    variants = {
        "official_fp32": official.generate,
        "official_bf16": official_bf16,
        "ours_fp32": Sam2MaskGenerator(model, **options).generate_masks,
        "ours_bf16": Sam2MaskGenerator(model, dtype="bf16", **options).generate_masks,
    }
    timings = interleaved(variants, image, repeats=args.repeats, device=device)
    reference = official_masks(variants["official_fp32"](image), device)
    ours = variants["ours_fp32"](image).masks
    return {"arch": name, "image": list(args.image_size), "options": options, "timings_s": timings,
            "ratio_official_over": {k: timings["official_fp32"]["median"] / v["median"] for k, v in timings.items()},
            "ratio_official_bf16_over_ours_bf16": timings["official_bf16"]["median"] / timings["ours_bf16"]["median"],
            "agreement": {"ours_fp32_vs_official": agreement(reference, ours),
                          "ours_bf16_vs_ours_fp32": agreement(ours, variants["ours_bf16"](image).masks)}}


def sam3_case(args, device: torch.device) -> dict:
    """The SAM 3 engine per image: 1 and 8 prompts, fp32 and bf16, first pass and a new prompt (cached vision)."""
    from slip.engines.build import SAM3_THRESHOLD
    from slip.engines.sam3 import Sam3Concepts
    from slip.engines.sam3_engine import Sam3Engine
    from slip.engines.sam3_model import Sam3Bundle, build_tiny_sam3
    from slip.options import SegmentOptions
    from slip.request import ModelRef, resolve

    model, processor = build_tiny_sam3()
    if not args.dry_run:  # the real architecture, random weights (the gated checkpoint is not needed for timing)
        from transformers import Sam3Config, Sam3Model

        torch.manual_seed(0)
        with torch.device(device):
            model = Sam3Model(Sam3Config()).eval()
        processor.image_processor.size = {"height": 1008, "width": 1008}
    model = model.to(device).eval()
    ref = ModelRef(spec="random sam3", arch="sam3", sha256="0" * 64)
    image = scene(*args.image_size)
    prompts = ["a red disc", "a blue box", "a green triangle", "a person", "a dog", "a car", "a tree", "a cup"]
    out = {}
    for dtype in ("fp32", "bf16"):
        request = resolve(SegmentOptions(), sam=ref, sam_generator={}, sam_filters="none", ranker=ref,
                          ranker_threshold=SAM3_THRESHOLD, dtype=dtype, engine="sam3")
        engine = Sam3Engine(Sam3Concepts(Sam3Bundle(model, processor, ref, None), dtype=dtype), request)

        def first_pass(count):
            def run(im):
                engine.concepts.clear()
                return engine(im, prompts[:count])
            return run

        variants = {f"{dtype}_1_prompt": first_pass(1), f"{dtype}_8_prompts": first_pass(8),
                    f"{dtype}_new_prompt_cached": lambda im: engine(im, ["a yellow star"])}
        out |= interleaved(variants, image, repeats=args.repeats, device=device)
    return {"model": "Sam3Model random (real size)" if not args.dry_run else "tiny-random-sam3",
            "image": list(args.image_size), "timings_s": out}


def queue_case(args, device: torch.device, work: Path) -> dict:
    """One job through the real queue on this machine's GPU: ms per image, submit to the last result."""
    from PIL import Image

    from bench.servers import private_redis
    from slip.rankers.hf_clip import build_tiny_clip, save_hf_clip
    from slip.sam import SAM_ARCHS, build_sam, save_sam

    arch = "tiny-random" if args.dry_run else "vit_h"
    torch.manual_seed(0)
    sam_path = save_sam(build_sam(SAM_ARCHS[arch]), work / "sam" / "sam.pth", SAM_ARCHS[arch])
    clip_dir = work / "clip"
    if args.dry_run:
        save_hf_clip(*build_tiny_clip(), clip_dir)
    else:
        from transformers import CLIPConfig, CLIPModel

        from slip.rankers.hf_clip import tiny_tokenizer

        save_hf_clip(CLIPModel(CLIPConfig()), tiny_tokenizer(), clip_dir)
    images = work / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(args.queue_images):
        Image.fromarray(np.roll(scene(*args.image_size), 37 * i, axis=1)).save(images / f"img_{i:03d}.jpg", quality=92)
    with private_redis() as broker:
        env = {**os.environ, "SLIP_BROKER_URL": broker, "SLIP_STORE": str(work / "store"), "SLIP_SAM": str(sam_path),
               "SLIP_CLIP": str(clip_dir), "SLIP_DEVICE": device.type, "SLIP_DTYPE": "fp32" if args.dry_run else "bf16",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q", "gpu,cpu", "-P", "solo",
                                   "-n", "gpu@%h", "--without-mingle", "--without-gossip"], env=env, cwd=ROOT,
                                  stdout=open(work / "worker.log", "wb"), stderr=subprocess.STDOUT)
        try:
            warm = _submit(env, images, ["warm-up"], args, limit=1)  # model load + first image, not timed
            start = time.perf_counter()
            proc = _submit(env, images, ["an object", "a shape"], args)
            seconds = time.perf_counter() - start
        finally:
            worker.terminate()
            worker.wait(timeout=60)
    return {"images": args.queue_images, "image": list(args.image_size), "sam": f"random {arch}", "clip": "random ViT-B/32",
            "dtype": env["SLIP_DTYPE"], "wall_s": seconds, "ms_per_image": 1000 * seconds / args.queue_images,
            "warm_up_s": warm["seconds"], "summary": proc["stdout"].strip().splitlines()[-1:]}


def _submit(env: dict, images: Path, prompts: list[str], args, limit: int | None = None) -> dict:
    paths = sorted(images.iterdir())[:limit] if limit else [images]
    command = [sys.executable, "-m", "producer", "submit", "segment", *map(str, paths), *(a for p in prompts for a in ("-p", p)),
               "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--points-per-side", str(args.points_per_side),
               "--batch-size", "4", "--wait", "--timeout", "600"]
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"submit failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return {"seconds": time.perf_counter() - start, "stdout": proc.stdout}


# --- measuring ---------------------------------------------------------------------------------------------


def interleaved(variants: dict, image: np.ndarray, *, repeats: int, device: torch.device) -> dict:
    """Each variant once to warm up, then all of them in turn ``repeats`` times; seconds per call."""
    for run in variants.values():
        run(image)
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            sync(device)
            start = time.perf_counter()
            run(image)
            sync(device)
            runs[name].append(time.perf_counter() - start)
    return {name: {"median": statistics.median(r), "min": min(r), "max": max(r), "runs": r} for name, r in runs.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def official_masks(records: list[dict], device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.stack([r["segmentation"] for r in records]), device=device) if records else torch.zeros(0)


def agreement(reference: torch.Tensor, other: torch.Tensor) -> dict:
    """Mask counts and, for each reference mask, the best IoU among ``other``'s (mean, min)."""
    if len(reference) == 0 or len(other) == 0:
        return {"reference": len(reference), "other": len(other), "mean_best_iou": None}
    a, b = reference.flatten(1).float(), other.to(reference.device).flatten(1).float()
    best = []
    for chunk in a.split(256):  # (256, HW) x (HW, M) intersections, bounded memory
        inter = chunk @ b.T
        union = chunk.sum(1, keepdim=True) + b.sum(1)[None] - inter
        best.append((inter / union.clamp(min=1)).amax(1))
    best = torch.cat(best)
    return {"reference": len(reference), "other": len(other), "mean_best_iou": float(best.mean()),
            "min_best_iou": float(best.min())}


# --- main --------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny models on any device: checks the code paths")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--archs", nargs="+", default=["vit_b", "vit_h"])
    parser.add_argument("--crops", type=int, default=150)
    parser.add_argument("--queue-images", type=int, default=24)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--cases", nargs="+", default=["sam", "clip", "sam2", "sam3", "queue"])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench/results")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.dry_run:
        parser.error("no CUDA GPU is visible: run with --dry-run to check the code paths on this CPU")
    if args.dry_run:
        args.archs, args.repeats, args.crops, args.queue_images = ["tiny-random"], 1, 8, 2
        args.image_size, args.points_per_side = (192, 256), 4
    else:
        args.image_size, args.points_per_side = (768, 1024), 32
    prefix = "gpu-dryrun" if args.dry_run else "gpu"
    machine = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
               "torch": torch.__version__, "cpus": os.cpu_count(), "loadavg_before": os.getloadavg()}
    results = {}
    with tempfile.TemporaryDirectory(prefix="slip-gpu-") as tmp:
        for case in args.cases:
            start = time.perf_counter()
            if case == "sam":
                figures = {arch: sam_case(arch, args, device) for arch in args.archs}
            elif case == "clip":
                figures = clip_case(args, device)
            elif case == "sam2":
                figures = sam2_case(args, device)
            elif case == "sam3":
                figures = sam3_case(args, device)
            else:
                figures = queue_case(args, device, Path(tmp))
            results[case] = {"case": case, "seconds": time.perf_counter() - start, "figures": figures}
            write(args.out_dir / f"{prefix}-{case}.json", results[case], machine, sys.argv[1:])
    print_table(results)


def write(path: Path, result: dict, machine: dict, argv: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"command": "bash bench/gpu.sh " + " ".join(argv), "machine": {**machine,
                                "loadavg_after": os.getloadavg()}, "date": datetime.now(timezone.utc).isoformat(
                                timespec="seconds"), **result}, indent=1))


def print_table(results: dict) -> None:
    for arch, r in results.get("sam", {}).get("figures", {}).items():
        t, agree = r["timings_s"], r["agreement"]
        line = ", ".join(f"{k} {v['median'] * 1000:.0f} ms" for k, v in t.items())
        print(f"sam {arch}: {line}; ours fp32 vs official: {agree['ours_fp32_vs_official']}")
    if "clip" in results:
        t = results["clip"]["figures"]["timings_s"]
        print("clip: " + ", ".join(f"{k} {v['median'] * 1000:.0f} ms" for k, v in t.items()))
    for case in ("sam2", "sam3"):
        if case in results:
            t = results[case]["figures"]["timings_s"]
            print(f"{case}: " + ", ".join(f"{k} {v['median'] * 1000:.0f} ms" for k, v in t.items()))
    if "queue" in results:
        q = results["queue"]["figures"]
        print(f"queue: {q['images']} images, {q['ms_per_image']:.0f} ms per image end to end ({q['dtype']})")


if __name__ == "__main__":
    main()
