"""SAM 3 engine, segment once / query many: a new prompt on images already seen vs the first pass.

    python bench/sam3_cache.py                                  # in process, tiny-random-sam3, 6 images (~1 min)
    python bench/sam3_cache.py --sam facebook/sam3 --images 20  # in process, the real model, when it is cached
    python bench/sam3_cache.py --queue                          # through a real worker (issue 16's target)
    python bench/sam3_cache.py --queue --sam real-size --images 1 --repeats 3 --threads 1   # ~10 min on CPU

**In process** (the default): per round a fresh engine (empty caches) answers ``--prompts`` prompts on every image
(the first pass: vision + text + decoders), then one new prompt on the same images (the vision features are cached
in the engine: text + decoders only).

**Through the queue** (``--queue``, issue 16's target: a new prompt on already-processed images >= 20x faster than
the first pass): a private ``redis-server``, one ``celery -A worker worker -Q gpu,cpu --concurrency 1`` serving
``SLIP_ENGINE=sam3`` with ``--sam``, a directory store, 1024x768 JPEG scenes (``bench.queue.make_scenes``). Each
round empties the store, then runs two jobs: the first (``slip submit segment --engine sam3 --keep-features``:
upload, SAM 3's backbone, the vision features packed to fp16 and stored, text + decoders, results), and a new
prompt on the same images (``--from-job JOB -p NEW``: the features read from the store, not the image; text +
decoders; results). The worker's in-process feature cache is off (``--features store``, the default: a bench-only
launcher sets ``worker.models.FEATURE_CACHE = 0``), as it would be for all but the last few images of a large job;
``--features process`` keeps it (a re-query of the last few images). A warm-up (one other image, both jobs) runs
first. Each job is timed from the client call to its last completion record (``bench.requery.run_submitted``);
figures per image, medians with [min, max] over the rounds, the load average; the worker's stage seconds.

``--sam real-size``: SAM 3's real architecture (``transformers.Sam3Config()`` defaults: ViT 1024 wide x 32 layers at
1008 px, FPN 256, DETR 6 + 6 layers, 200 queries; 840 M parameters) with random weights, saved once as a SAM 3
directory (``--model-dir``, default ``/tmp/slip-sam3-real-size``, 3.4 GB) and served by path; its answers mean
nothing, its costs are the real model's. ``--flops`` counts each part's floating-point operations
(``torch.utils.flop_counter``: the backbone on meta tensors, text and decoders on the model) to explain the ratio:
tiny-random-sam3 keeps the 1008-px input but its backbone is 32 wide, so its decoders cost as much as its
backbone and no cache can make a new prompt much cheaper than the first pass.

Writes ``bench/results/sam3-cache-<sam>-<n>prompts.json`` (in process) or ``bench/results/sam3-queue-<sam>.json``.
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
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

PROMPTS = ["a red disc", "a blue box", "a green triangle", "a person", "a dog", "a car", "a tree", "a cup"]
NEW_PROMPT = "a yellow star"
FIRST_PROMPTS = ("a circle", "a square", "a house", "a cat", "a tree", "an arrow")  # one new prompt per job
NEW_PROMPTS = ("a star", "a heart", "a triangle", "a hexagon", "a fish", "a mushroom")
REAL_SIZE = "real-size"  # --sam: SAM 3's real architecture with random weights
TARGET_RATIO = 20.0  # issue 16: a new prompt on processed images >= 20x faster than the first pass (queue)
NO_FEATURE_CACHE = ("import sys, worker.models as m; m.FEATURE_CACHE = 0; from celery.__main__ import main; "
                    "sys.argv = ['celery', *sys.argv[1:]]; main()")  # bench only: the worker's process LRU off


def scenes(count: int, size: tuple[int, int]) -> list[np.ndarray]:
    from bench.segment import make_scene

    return [make_scene(size[1], size[0], seed) for seed in range(count)]


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


# --- in process ---------------------------------------------------------------------------------------------------


def one_round(models, images: list[np.ndarray], prompts: list[str]) -> dict:
    """A fresh engine: mean seconds per image of the first pass and of a new prompt afterwards."""
    from slip.engines.build import build_engine
    from slip.options import SegmentOptions

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


def in_process(args, spec: str) -> dict:
    from slip.settings import ModelSettings

    width, height = (int(v) for v in args.size.lower().split("x"))
    images = scenes(args.images, (height, width))
    models = ModelSettings(engine="sam3", sam=spec, device=args.device)
    prompts = PROMPTS[: args.prompts]
    one_round(models, images[:1], prompts)  # warm-up: model load, allocator
    rounds = []
    for i in range(args.repeats):
        rounds.append(one_round(models, images, prompts))
        print(f"round {i + 1}: first pass {rounds[-1]['first_pass']:.3f} s/image, "
              f"new prompt {rounds[-1]['new_prompt']:.3f} s/image", flush=True)
    first, new = summary([r["first_pass"] for r in rounds]), summary([r["new_prompt"] for r in rounds])
    result = {"first_pass_s_per_image": first, "new_prompt_s_per_image": new,
              "speedup": first["median"] / new["median"],
              "speedup_range": [first["min"] / new["max"], first["max"] / new["min"]], "rounds": rounds}
    print(f"new prompt on seen images: x{result['speedup']:.1f} faster than the first pass "
          f"(x{result['speedup_range'][0]:.1f}..x{result['speedup_range'][1]:.1f})")
    return {"mode": "in process", "size": args.size, "prompts": prompts, "new_prompt": NEW_PROMPT, "result": result}


# --- through the queue --------------------------------------------------------------------------------------------


def through_queue(args, spec: str) -> dict:
    from bench.queue import bench_worker, clear_store, make_scenes, worker_env
    from bench.requery import run_submitted
    from bench.servers import private_redis
    from jobs.settings import Settings
    from producer.client import QueueClient

    with tempfile.TemporaryDirectory(prefix="slip-bench-sam3-", dir=args.workdir) as tmp:
        work = Path(tmp)
        paths = [str(p) for p in make_scenes(work / "images", args.images, seed=5)]
        warm = [str(p) for p in make_scenes(work / "warm", 1, seed=6)]
        store = work / "store"
        with private_redis() as url:
            env = worker_env(url, store, SLIP_ENGINE="sam3", SLIP_SAM=spec, SLIP_DEVICE=args.device,
                             SLIP_TASK_TIME_LIMIT="3600", SLIP_VISIBILITY_TIMEOUT="4000",
                             **({"SLIP_THREADS": str(args.threads)} if args.threads else {}))
            launcher = [sys.executable, "-c", NO_FEATURE_CACHE] if args.features == "store" else None
            with bench_worker(env, work / "worker.log", name="sam3", launcher=launcher) as worker:
                client = QueueClient(Settings.from_env(env))

                def pair(images: list[str], first_prompt: str, new_prompt: str) -> tuple[dict, dict]:
                    first = run_submitted(client, lambda: client.submit_segment(
                        images, [first_prompt], {}, engine="sam3", sam=spec, keep_features=True,
                        batch_size=args.batch_size), images=len(images), store_root=store)
                    new = run_submitted(client, lambda: client.submit_from_job(first["job_id"], prompts=[new_prompt]),
                                        images=len(images), store_root=store)
                    if new["how"] != ["cached"]:
                        raise RuntimeError(f"the new prompt did not use the cached features: {new['how']}")
                    return first, new

                warm_first, warm_new = pair(warm, "a warm-up", "another warm-up")
                rounds = []
                for repeat in range(args.repeats):
                    clear_store(store)
                    first, new = pair(paths, FIRST_PROMPTS[repeat % 6], NEW_PROMPTS[repeat % 6])
                    sources = {d["runtime"]["features"] for d in result_docs(client, new["job_id"])}
                    for run in (first, new):  # bench.queue.split's parts are the slip engine's stages: total only
                        run["ms_per_image"] = {"total": run["wall_s"] / run["images"] * 1e3}
                    ratio = first["ms_per_image"]["total"] / new["ms_per_image"]["total"]
                    rounds.append({"round": repeat, "first": first, "new_prompt": new, "ratio": ratio,
                                   "features_from": sorted(sources)})
                    print(f"round {repeat}: first pass {first['ms_per_image']['total'] / 1e3:.2f} s/image, new prompt "
                          f"{new['ms_per_image']['total'] / 1e3:.3f} s/image, x{ratio:.1f} (features from "
                          f"{', '.join(sorted(sources))})", flush=True)
                feature_bytes = [p.stat().st_size for p in store.glob("proposals/*/*/vision.safetensors")]
    first_ms = summary([r["first"]["ms_per_image"]["total"] for r in rounds])
    new_ms = summary([r["new_prompt"]["ms_per_image"]["total"] for r in rounds])
    ratios = summary([r["ratio"] for r in rounds])
    def stage(key: str) -> dict:
        names = sorted({s for r in rounds for s in r[key]["stages_s"]})
        return {s: statistics.median(r[key]["stages_s"].get(s, 0.0) / r[key]["images"] * 1e3 for r in rounds)
                for s in names}

    print(f"through the queue: first pass {first_ms['median'] / 1e3:.2f} s/image, new prompt "
          f"{new_ms['median'] / 1e3:.3f} s/image: x{ratios['median']:.1f} [{ratios['min']:.1f}, {ratios['max']:.1f}] "
          f"(target >= x{TARGET_RATIO:.0f}: {'met' if ratios['median'] >= TARGET_RATIO else 'NOT met'}); features "
          f"{statistics.median(feature_bytes) / 1e6:.1f} MB per image (fp16)")
    return {
        "mode": "queue", "features": args.features, "images": args.images,
        "image": "1024x768 JPEG (bench.queue.make_scenes)",
        "batch_size": args.batch_size, "worker": "celery -A worker worker -Q gpu,cpu --concurrency 1",
        "worker_threads": worker["health"].get("threads"), "sam": worker["health"].get("sam"),
        "warmup": {"first": {k: warm_first[k] for k in ("wall_s", "images", "how")},
                   "new_prompt": {k: warm_new[k] for k in ("wall_s", "images", "how")}},
        "rounds": rounds,
        "summary": {"first_ms_per_image": first_ms, "new_prompt_ms_per_image": new_ms, "ratio": ratios,
                    "first_stages_ms_per_image": stage("first"), "new_prompt_stages_ms_per_image": stage("new_prompt"),
                    "feature_bytes_per_image": statistics.median(feature_bytes)},
        "target": {"ratio": TARGET_RATIO, "met": ratios["median"] >= TARGET_RATIO},
    }


def result_docs(client, job: str) -> list[dict]:
    return [item.doc for item in client.export_items(job)]


# --- the real architecture, random weights ------------------------------------------------------------------------


def real_size_config():
    """``transformers.Sam3Config()``: the released SAM 3's architecture; its text ids fitted to the offline
    tokenizer (the vocabulary stays 49408 entries)."""
    from transformers import Sam3Config

    from slip.rankers.hf_clip import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = Sam3Config()
    text = config.text_config
    text.bos_token_id, text.eos_token_id, text.pad_token_id = (tokenizer.cls_token_id, tokenizer.sep_token_id,
                                                               tokenizer.pad_token_id)
    return config, tokenizer


def real_size_directory(folder: Path) -> Path:
    """A SAM 3 directory of the real architecture with seeded random weights (built once, 3.4 GB)."""
    from transformers import Sam3ImageProcessor, Sam3Model, Sam3Processor

    from slip.engines.sam3_model import save_sam3

    if (folder / "config.json").is_file():
        return folder
    start = time.perf_counter()
    config, tokenizer = real_size_config()
    torch.manual_seed(0)
    model = Sam3Model(config).eval()
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    save_sam3(model, Sam3Processor(image_processor=Sam3ImageProcessor(), tokenizer=tokenizer), staging)
    staging.rename(folder)
    print(f"built {folder} in {time.perf_counter() - start:.0f} s", flush=True)
    return folder


def count_flops(spec: str) -> dict:
    """Floating-point operations of one image's backbone (vision features) and of one prompt's text encoder and
    decoders. The real architecture: the backbone counted on meta tensors, the rest on random values (operation
    counts do not depend on values)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Sam3Model
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    def flops(fn):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            out = fn()
        return out, counter.get_total_flops()

    if spec == REAL_SIZE:
        config, _ = real_size_config()
        with torch.device("meta"):
            meta = Sam3Model(config).eval()
        _, vision_flops = flops(lambda: meta.get_vision_features(pixel_values=torch.zeros(1, 3, 1008, 1008,
                                                                                          device="meta")))
        with torch.device("meta"):
            model = Sam3Model(config).eval()
        model = model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.02)
            for _, b in model.named_buffers():
                b.zero_() if b.is_floating_point() else b.copy_(torch.arange(b.shape[-1]).expand_as(b))
        from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

        side = 1008 // 14
        levels = [(4 * side, 4 * side), (2 * side, 2 * side), (side, side), (side // 2, side // 2)]
        vision = Sam3VisionEncoderOutput(last_hidden_state=None,
                                         fpn_hidden_states=tuple(torch.randn(1, 256, h, w) for h, w in levels),
                                         fpn_position_encoding=tuple(torch.randn(1, 256, h, w) for h, w in levels))
    else:
        from slip.engines.sam3_model import load_sam3

        model = load_sam3(spec, device="cpu").model
        vision, vision_flops = flops(lambda: model.get_vision_features(pixel_values=torch.zeros(1, 3, 1008, 1008)))
    ids, mask = torch.randint(1000, 2000, (1, 32)), torch.ones(1, 32, dtype=torch.long)
    text, text_flops = flops(lambda: model.get_text_features(input_ids=ids, attention_mask=mask))
    _, decoder_flops = flops(lambda: model(vision_embeds=vision, attention_mask=mask,
                                           text_embeds=BaseModelOutputWithPooling(pooler_output=text.pooler_output)))
    per_prompt = text_flops + decoder_flops
    return {"backbone_tflop": vision_flops / 1e12, "text_tflop": text_flops / 1e12,
            "decoders_tflop": decoder_flops / 1e12,
            "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "compute_bound_ratio": (vision_flops + per_prompt) / per_prompt,
            "what": "compute_bound_ratio: (backbone + one prompt) / one prompt, the most a feature cache can give "
                    "when nothing but arithmetic costs time"}


# --- main -----------------------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sam", default="tiny-random-sam3", help="SAM 3 spec (tiny-random-sam3, sam3, a directory) or "
                                                             f"{REAL_SIZE}")
    p.add_argument("--queue", action="store_true", help="through a real worker (default: in process)")
    p.add_argument("--features", choices=("store", "process"), default="store",
                   help="--queue: new prompts read the stored features (default) or the worker's in-process cache")
    p.add_argument("--images", type=int, default=6)
    p.add_argument("--size", default="640x480", help="in process: WxH of the generated scenes")
    p.add_argument("--prompts", type=int, default=1, help="in process: prompts of the first pass (1..8)")
    p.add_argument("--batch-size", type=int, default=4, help="--queue: images per task")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (the worker's SLIP_THREADS with --queue)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--flops", action="store_true", help="count each part's floating-point operations")
    p.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "slip-sam3-real-size")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.queue and shutil.which("redis-server") is None:
        p.error("redis-server is not installed (apt-get install redis-server)")
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    spec = str(real_size_directory(args.model_dir)) if args.sam == REAL_SIZE else args.sam
    record = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "sam": args.sam, "spec": spec,
              "threads": args.threads or torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "torch": torch.__version__}
    record |= through_queue(args, spec) if args.queue else in_process(args, spec)
    if args.flops:
        record["flops"] = count_flops(args.sam if args.sam == REAL_SIZE else spec)
        f = record["flops"]
        print(f"FLOPs: backbone {f['backbone_tflop']:.3f} T, text {f['text_tflop']:.4f} T, decoders "
              f"{f['decoders_tflop']:.3f} T per prompt: at most x{f['compute_bound_ratio']:.1f} from the feature cache")
    record["load_average"] = {"before": load_before, "after": os.getloadavg()}
    name = Path(args.sam).name
    default = (f"sam3-queue-{name}.json" if args.queue else f"sam3-cache-{name}-{args.prompts}prompts.json")
    out = args.out or ROOT / "bench" / "results" / default
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
