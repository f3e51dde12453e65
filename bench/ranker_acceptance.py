"""Ranker acceptance on the synthetic world: untrained vs fine-tuned, oracle and SAM proposals, one command.

    python bench/ranker_acceptance.py            # ~9 min on a (quiet) 2-core CPU, offline

Steps (the same as the CLI sequence printed at the start):

1. ``slip data synth``: the 27 synthetic classes, ``--per-class`` images each, with object masks (the
   training data: split 80/20 into training and checkpoint-selection images);
2. ``slip data synth --seed SEED+1``: a separate **test** dataset, never seen by training nor by
   checkpoint selection (the honest held-out set: every one of its images is composited);
3. ``slip train-ranker``: the paper's dual encoder and recipe, from random init (timm resnet18 image
   backbone at 64 px; the offline pretrained MiniLM text encoder, mean pooled), the untrained
   starting point saved beside the best checkpoint;
4. ``slip evaluate-local``: both rankers on the same seeded 2x2 composites of the test images, every
   class of every composite queried, with oracle proposals (4 objects + 8 distractors per composite)
   and with the bundled synth SAM's proposals.

Accuracy is object-level: the chosen segment must be the prompted object (IoU > 0.5 with its true
mask); the lenient tile accuracy (chosen segment mostly in the prompted tile) is reported beside it.
Chance with oracle proposals is 1/12 (one right segment of 12), not the 25 % of the tile criterion.

Prints the accuracy tables and writes ``bench/results/ranker_acceptance.json`` (and an HTML report in
the work directory). Targets: fine-tuned >= 90 % (oracle proposals), untrained near chance (1/12).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# bench/ holds a queue.py that would shadow the standard library's `queue`: import from the repo root
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

import torch  # noqa: E402


from slip.data.synth import generate_dataset  # noqa: E402
from slip.evaluate import evaluate_rankers, format_table  # noqa: E402
from slip.rankers.dual_encoder import DualEncoderConfig  # noqa: E402
from slip.report import report_from_runs  # noqa: E402
from slip.train import TrainConfig, train_ranker  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/slip-ranker-acceptance"), help="dataset + checkpoints")
    p.add_argument("--classes", type=int, default=27)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--size", type=int, default=96, help="synthetic image side, px")
    p.add_argument("--image-backbone", default="resnet18")
    p.add_argument("--text-encoder", default="minilm")
    p.add_argument("--image-size", type=int, default=64, help="crop side the ranker sees, px")
    p.add_argument("--proj-dim", type=int, default=128)
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-4, help="projection heads (the grid lr)")
    p.add_argument("--image-lr", type=float, default=1e-3, help="image backbone (random init: above the recipe's 1e-4)")
    p.add_argument("--text-lr", type=float, default=1e-5)
    p.add_argument("--composites", type=int, default=200)
    p.add_argument("--test-per-class", type=int, default=20, help="images per class of the separate test dataset")
    p.add_argument("--sam", default="synth", help="SAM spec of the SAM-proposal evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads; 1 is fastest on a shared 2-core machine (OpenMP spin-waits), "
                        "2 can win on an idle one")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ranker_acceptance.json")
    return p.parse_args()


def main() -> int:
    a = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(a.threads)
    data, test, ckpt = a.work / "synth", a.work / "test", a.work / "ranker"
    print("equivalent CLI:\n"
          f"  slip data synth --classes {a.classes} --per-class {a.per_class} --size {a.size} --seed {a.seed} --out {data}\n"
          f"  slip data synth --classes {a.classes} --per-class {a.test_per_class} --size {a.size} --seed {a.seed + 1} "
          f"--out {test}\n"
          f"  slip train-ranker {data} --out {ckpt} --image-backbone {a.image_backbone} --text-encoder {a.text_encoder} "
          f"--image-size {a.image_size} --proj-dim {a.proj_dim} --epochs {a.epochs} --lr {a.lr} --image-lr {a.image_lr} "
          f"--text-lr {a.text_lr} --seed {a.seed} --random-image --save-initial --threads {a.threads}\n"
          f"  slip evaluate-local {test} --split all --ranker {ckpt}/initial --ranker {ckpt} --composites {a.composites} "
          f"--tile-size {a.size} --proposals oracle|sam --sam {a.sam}\n", flush=True)
    timings = {}
    start = time.perf_counter()
    # 1. the synthetic datasets (regenerated: deterministic, seconds): training, and a separate test one
    generate_dataset(data, classes=a.classes, per_class=a.per_class, size=a.size, seed=a.seed)
    generate_dataset(test, classes=a.classes, per_class=a.test_per_class, size=a.size, seed=a.seed + 1)
    timings["synth_s"] = time.perf_counter() - start
    # 2. train from random init; the untrained starting point is saved too
    model = DualEncoderConfig(image_backbone=a.image_backbone, text_encoder=a.text_encoder,
                              text_pooling="mean" if a.text_encoder == "minilm" else "cls",
                              image_size=a.image_size, proj_dim=a.proj_dim, pretrained_image=False,
                              pretrained_text=True)
    config = TrainConfig(epochs=a.epochs, lr=a.lr, image_lr=a.image_lr, text_lr=a.text_lr, seed=a.seed,
                         device="cpu", save_initial=True)
    t = time.perf_counter()
    trained = train_ranker(data, ckpt, model=model, config=config)
    timings["train_s"] = time.perf_counter() - t
    # 3. both rankers on the same composites of the test dataset: oracle proposals, then SAM's
    runs = {}
    for proposals in ("oracle", "sam"):
        t = time.perf_counter()
        runs[proposals] = evaluate_rankers(test, [str(ckpt / "initial"), str(ckpt)], composites=a.composites, seed=a.seed,
                                           tile_size=a.size, device="cpu", progress=True, split="all",
                                           proposals=proposals, sam=a.sam)
        timings[f"evaluate_{proposals}_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start
    (a.work / "report.html").write_text(report_from_runs(runs["oracle"] + runs["sam"],
                                                         title="Ranker acceptance (synthetic test set)"))

    for proposals, pair in runs.items():
        print(f"\n{proposals} proposals (test dataset, seed {a.seed + 1}, never trained on):\n" + format_table(pair))
    untrained, tuned = (r.summary["plain"]["accuracy"] for r in runs["oracle"])
    sam_untrained, sam_tuned = (r.summary["plain"]["accuracy"] for r in runs["sam"])
    print(f"\nobject-level accuracy, oracle proposals: untrained {untrained:.1%} (chance 1/12 = 8.3%), fine-tuned "
          f"{tuned:.1%} (target >= 90%); SAM proposals: untrained {sam_untrained:.1%}, fine-tuned {sam_tuned:.1%}; "
          f"total {timings['total_s'] / 60:.1f} min (synth {timings['synth_s']:.0f} s, train {timings['train_s']:.0f} s, "
          f"evaluate {timings['evaluate_oracle_s'] + timings['evaluate_sam_s']:.0f} s); report: {a.work / 'report.html'}")
    record = {
        "command": "python bench/ranker_acceptance.py " + " ".join(sys.argv[1:]),
        "args": {k: str(v) for k, v in vars(a).items()},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "platform": platform.platform()},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "training": {"best_epoch": trained.best_epoch, "best_val_loss": trained.best_val_loss, "epochs": trained.history},
        "test_set": {"dataset": f"synthetic, seed {a.seed + 1}, {a.test_per_class} images per class (separate from the "
                                f"seed-{a.seed} training data; all its images composited)", "split": "all"},
        "accuracy": "object-level: the chosen segment has IoU > 0.5 with the prompted object's true mask",
        "untrained": runs["oracle"][0].to_json(),
        "fine_tuned": runs["oracle"][1].to_json(),
        "sam_proposals": {"sam": a.sam, "untrained": runs["sam"][0].to_json(), "fine_tuned": runs["sam"][1].to_json()},
        "targets": {"fine_tuned_at_least_0.90": tuned >= 0.90, "untrained_near_chance": abs(untrained - 1 / 12) <= 0.1,
                    "under_15_min": timings["total_s"] < 900},
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(record, indent=2))
    print(f"wrote {a.out}")
    return 0 if all(record["targets"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
