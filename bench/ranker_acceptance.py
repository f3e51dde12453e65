"""Ranker acceptance on the synthetic world: untrained vs fine-tuned, oracle proposals, one command.

    python bench/ranker_acceptance.py            # ~8 min on a (shared) 2-core CPU, offline

Steps (the same as the CLI sequence printed at the start):

1. ``slip data synth``: the 27 synthetic classes, ``--per-class`` images each, with object masks;
2. ``slip train-ranker``: the paper's dual encoder and recipe, from random init (timm resnet18 image
   backbone at 64 px; the offline pretrained MiniLM text encoder, mean pooled), the untrained
   starting point saved beside the best checkpoint;
3. ``slip evaluate-local``: both rankers on the same seeded 2x2 composites of held-out images, oracle
   proposals (4 objects + 8 distractors per composite), every class of every composite queried.

Prints the accuracy table and writes ``bench/results/ranker_acceptance.json`` (and an HTML report in
the work directory). Targets: fine-tuned >= 90 %, untrained near chance (25 %).
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
    data, ckpt = a.work / "synth", a.work / "ranker"
    print("equivalent CLI:\n"
          f"  slip data synth --classes {a.classes} --per-class {a.per_class} --size {a.size} --seed {a.seed} --out {data}\n"
          f"  slip train-ranker {data} --out {ckpt} --image-backbone {a.image_backbone} --text-encoder {a.text_encoder} "
          f"--image-size {a.image_size} --proj-dim {a.proj_dim} --epochs {a.epochs} --lr {a.lr} --image-lr {a.image_lr} "
          f"--text-lr {a.text_lr} --seed {a.seed} --random-image --save-initial --threads {a.threads}\n"
          f"  slip evaluate-local {data} --ranker {ckpt}/initial --ranker {ckpt} --composites {a.composites} "
          f"--tile-size {a.size}\n", flush=True)
    timings = {}
    start = time.perf_counter()
    # 1. the synthetic dataset (regenerated: it is deterministic and takes seconds)
    generate_dataset(data, classes=a.classes, per_class=a.per_class, size=a.size, seed=a.seed)
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
    # 3. both rankers on the same composites, oracle proposals
    t = time.perf_counter()
    runs = evaluate_rankers(data, [str(ckpt / "initial"), str(ckpt)], composites=a.composites, seed=a.seed,
                            tile_size=a.size, device="cpu", progress=True)
    timings["evaluate_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start
    (a.work / "report.html").write_text(report_from_runs(runs, title="Ranker acceptance (synthetic, oracle proposals)"))

    untrained, tuned = (r.summary["plain"]["accuracy"] for r in runs)
    print("\n" + format_table(runs))
    print(f"\nuntrained {untrained:.1%} (target ~25%), fine-tuned {tuned:.1%} (target >= 90%); "
          f"total {timings['total_s'] / 60:.1f} min (synth {timings['synth_s']:.0f} s, train {timings['train_s']:.0f} s, "
          f"evaluate {timings['evaluate_s']:.0f} s); report: {a.work / 'report.html'}")
    record = {
        "command": "python bench/ranker_acceptance.py " + " ".join(sys.argv[1:]),
        "args": {k: str(v) for k, v in vars(a).items()},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "platform": platform.platform()},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "training": {"best_epoch": trained.best_epoch, "best_val_loss": trained.best_val_loss, "epochs": trained.history},
        "untrained": runs[0].to_json(),
        "fine_tuned": runs[1].to_json(),
        "targets": {"fine_tuned_at_least_0.90": tuned >= 0.90, "untrained_near_chance": abs(untrained - 0.25) <= 0.1,
                    "under_15_min": timings["total_s"] < 900},
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(record, indent=2))
    print(f"wrote {a.out}")
    return 0 if all(record["targets"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
