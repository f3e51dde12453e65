"""``slip compare`` on ``slip data synth --coco`` data: the bundled synth pair against the tiny-random models.

    python bench/compare.py                                 # 5 classes x 4 images, 3 configurations (~2-4 min)
    python bench/compare.py --classes 10 --per-class 10      # the README figure (~10-15 min on 2 cores)

Generates the dataset (seeded) in a temporary folder, runs the comparison in process (one untimed warm-up image
per configuration), and writes bench/results/compare-synth.json (the compare.json document plus the command,
the wall time and the load average) and the page under bench/results/compare-synth/ (index.html + examples).
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
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

CONFIGS = (
    "synth=sam=synth,clip=synth",
    "tiny-random=sam=tiny-random,clip=tiny-random,points_per_side=8,filters=none",
    "tiny-sam3=engine=sam3,sam=tiny-random-sam3",
)


def main() -> None:
    from slip.compare import check_candidates, load_truth, parse_config, run_comparison
    from slip.compare_page import write_report
    from slip.data.synth import COCO_FILE, generate_dataset
    from slip.inputs import expand_paths

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--per-class", type=int, default=4)
    p.add_argument("--seed", type=int, default=7, help="dataset seed (the bundled models trained on seed 0)")
    p.add_argument("--config", action="append", default=None, help="NAME=SPEC (default: synth, tiny-random, tiny-sam3)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--job-size", type=int, default=10_000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "compare-synth.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="slip-compare-") as tmp:
        data = generate_dataset(Path(tmp) / "synth", classes=args.classes, per_class=args.per_class, seed=args.seed,
                                coco=True)
        checked = check_candidates([parse_config(c) for c in args.config or CONFIGS], device="cpu", cache_dir=None)
        files = expand_paths([str(data)])
        truth = load_truth(data / COCO_FILE, files)
        scores, shown = run_comparison(checked, truth, job_size=args.job_size, workers=args.workers)
        page_dir = args.out.with_suffix("")
        report, page = write_report(page_dir, scores, truth, shown, truth_path=data / COCO_FILE,
                                    job_size=args.job_size, workers=args.workers, command=sys.argv)
        document = json.loads(report.read_text())
    document |= {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "threads": args.threads,
                 "wall_s": time.perf_counter() - start, "dataset": {"classes": args.classes,
                                                                   "per_class": args.per_class, "seed": args.seed},
                 "load_average": {"before": load_before, "after": os.getloadavg()}, "page": str(page)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1))
    print(f"{'config':<14}{'AP':>7}{'AP50':>7}{'F1':>7}{'s/img p50':>11}{'p90':>7}")
    for c in document["configs"]:
        print(f"{c['name']:<14}{c['ap']:>7.3f}{c['ap50']:>7.3f}{c['f1']:>7.3f}{c['seconds_p50']:>11.3f}"
              f"{c['seconds_p90']:>7.3f}")
    print(f"wrote {args.out} and {page}")


if __name__ == "__main__":
    main()
