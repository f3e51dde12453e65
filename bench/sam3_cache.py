"""SAM 3 engine, segment once / query many, in process: a new prompt on images already seen vs the first pass.

    python bench/sam3_cache.py                                  # tiny-random-sam3, 6 images, 3 rounds (~1 min)
    python bench/sam3_cache.py --sam facebook/sam3 --images 20  # the real model, when it is in the cache

Per round: a fresh engine (empty caches) answers ``--prompts`` prompts on every image (the first pass: vision +
text + decoders), then one new prompt on the same images (the vision features are cached: text + decoders only).
Rounds repeat ``--repeats`` times after one warm-up round; figures are medians with [min, max] of the per-round
mean seconds per image; the ratio is first pass / new prompt. Writes bench/results/sam3-cache-<sam>.json with
the command and the load average.

Where the time goes: SAM 3's DETR encoder fuses the prompt into the image tokens and its mask decoder reads that
fused map, so a new prompt always pays the encoder-decoder part; only the ViT backbone and FPN neck are
prompt-independent. For the real model the backbone is most of the work; the tiny-random model keeps the
real input size (1008 px) but not the real proportions of its parts.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE, ROOT = Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from slip.engines.build import build_engine  # noqa: E402
from slip.options import SegmentOptions  # noqa: E402
from slip.settings import ModelSettings  # noqa: E402

PROMPTS = ["a red disc", "a blue box", "a green triangle", "a person", "a dog", "a car", "a tree", "a cup"]
NEW_PROMPT = "a yellow star"


def scenes(count: int, size: tuple[int, int]) -> list[np.ndarray]:
    from bench.segment import make_scene

    return [make_scene(size[1], size[0], seed) for seed in range(count)]


def one_round(models: ModelSettings, images: list[np.ndarray], prompts: list[str]) -> dict:
    """A fresh engine: mean seconds per image of the first pass and of a new prompt afterwards."""
    engine = build_engine(models, SegmentOptions())
    first, new = [], []
    for image in images:
        start = time.perf_counter()
        engine(image, prompts)
        first.append(time.perf_counter() - start)
    for image in images:
        start = time.perf_counter()
        engine(image, [NEW_PROMPT])
        new.append(time.perf_counter() - start)
    return {"first_pass": statistics.mean(first), "new_prompt": statistics.mean(new)}


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sam", default="tiny-random-sam3", help="SAM 3 spec (tiny-random-sam3, sam3, a directory)")
    p.add_argument("--images", type=int, default=6)
    p.add_argument("--size", default="640x480", help="WxH of the generated scenes")
    p.add_argument("--prompts", type=int, default=1, help="prompts of the first pass (1..8)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    width, height = (int(v) for v in args.size.lower().split("x"))
    images = scenes(args.images, (height, width))
    models = ModelSettings(engine="sam3", sam=args.sam, device=args.device)
    prompts = PROMPTS[: args.prompts]
    one_round(models, images[:1], prompts)  # warm-up: model load, allocator
    rounds = []
    for i in range(args.repeats):
        rounds.append(one_round(models, images, prompts))
        print(f"round {i + 1}: first pass {rounds[-1]['first_pass']:.3f} s/image, "
              f"new prompt {rounds[-1]['new_prompt']:.3f} s/image")
    first, new = summary([r["first_pass"] for r in rounds]), summary([r["new_prompt"] for r in rounds])
    result = {"first_pass_s_per_image": first, "new_prompt_s_per_image": new,
              "speedup": first["median"] / new["median"],
              "speedup_range": [first["min"] / new["max"], first["max"] / new["min"]], "rounds": rounds}
    print(f"new prompt on seen images: x{result['speedup']:.1f} faster than the first pass "
          f"(x{result['speedup_range'][0]:.1f}..x{result['speedup_range'][1]:.1f})")
    record = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "sam": args.sam,
              "images": args.images, "size": args.size, "prompts": prompts, "new_prompt": NEW_PROMPT,
              "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "load_average": {"before": load_before, "after": os.getloadavg()}, "torch": torch.__version__,
              "result": result}
    out = args.out or ROOT / "bench" / "results" / f"sam3-cache-{Path(args.sam).name}-{args.prompts}prompts.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
