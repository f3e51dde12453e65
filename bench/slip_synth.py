"""The full SLIP pipeline, offline, end to end: the bundled model pair on held-out 2x2 composites.

    python -m bench.slip_synth              # --sam synth --clip synth, 200 composites; ~2 min on 2 CPU cores

The test images are a synthetic dataset generated with ``--seed`` (default 1), all of its images
composited (``split="all"``): the bundled models were trained (and their checkpoints selected) on the
seed-0 dataset, so no test image, object or background was seen in training or checkpoint selection. The
evaluation (``slip.evaluate``) is the paper's protocol, corrected: seeded 2x2 composites of four classes,
every class of every composite queried, object-level scoring (the chosen segment has IoU > 0.5 with the
prompted object's true mask), with the lenient tile accuracy (the chosen segment lies mostly inside the
prompted class's tile) beside it. It runs twice on the same composites:

* ``oracle`` — proposals are the ground-truth segments plus distractors: the ranker alone (the paper's
  setting);
* ``sam`` — proposals are the bundled SAM's automatic masks after the default annotation filters: the
  whole SLIP pipeline.

Equivalent CLI (``slip evaluate-local DATASET --split all --ranker synth --proposals oracle|sam --sam synth``).
Prints the table and writes ``bench/results/slip_synth.json`` and an HTML report (``--report``).
(Run it as a module: ``bench/queue.py`` would shadow the standard library's ``queue``.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from slip.data.synth import CLASS_NAMES, generate_dataset
from slip.evaluate import evaluate_rankers, format_table
from slip.report import report_from_runs
from slip.options import SegmentOptions
from slip.request import chain_text, resolve_proposals
from slip.sam import recommended_filters, recommended_generator_params

RESULTS = Path(__file__).parent / "results" / "slip_synth.json"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sam", default="synth", help="SAM spec of the proposals")
    p.add_argument("--clip", default="synth", help="ranker spec")
    p.add_argument("--seed", type=int, default=1, help="seed of the held-out dataset and its composites")
    p.add_argument("--per-class", type=int, default=10, help="test images per class (all go to composites)")
    p.add_argument("--composites", type=int, default=200)
    p.add_argument("--filters", default=None, help="annotation filters on SAM's masks (default: the SAM's filters.json, else containment)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--report", type=Path, default=None, help="HTML report path (default: in the work directory)")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args()


def main() -> int:
    a = parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="slip-synth-eval-"))
    data = generate_dataset(work / "heldout", classes=len(CLASS_NAMES), per_class=a.per_class, size=128, seed=a.seed)
    common = dict(composites=a.composites, seed=a.seed, tile_size=128, device="cpu", progress=True, split="all")
    runs, seconds = {}, {}
    for proposals in ("oracle", "sam"):
        start = time.perf_counter()
        (run,) = evaluate_rankers(data, [a.clip], proposals=proposals, sam=a.sam, filters=a.filters, **common)
        run.spec = f"{a.clip} ({proposals} proposals)"
        runs[proposals], seconds[proposals] = run, time.perf_counter() - start
    report = a.report or work / "report.html"
    report.write_text(report_from_runs(list(runs.values()), title="SLIP on held-out synthetic composites"))
    print("\n" + format_table(list(runs.values())))
    oracle, sam = (runs[k].summary["plain"]["accuracy"] for k in ("oracle", "sam"))
    print(f"\nobject-level accuracy: full SLIP (SAM proposals) {sam:.1%} vs oracle proposals {oracle:.1%} (target >= 80 %); "
          f"{seconds['sam'] / a.composites * 1000:.0f} ms per composite with SAM; report: {report}")
    resolved = resolve_proposals(SegmentOptions.parse({"filters": a.filters}), sam_spec=a.sam,
                                 sam_generator=recommended_generator_params(a.sam), sam_filters=recommended_filters(a.sam))
    record = {
        "command": "python -m bench.slip_synth " + " ".join(sys.argv[1:]),
        "args": {k: str(v) for k, v in vars(a).items()},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "generator": resolved[0].to_json(),
        "filters": chain_text(resolved[1]),
        "test_set": f"synthetic, seed {a.seed}, {a.per_class} images per class, all composited (split 'all')",
        "accuracy": "object-level: the chosen segment has IoU > 0.5 with the prompted object's true mask",
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "oracle": runs["oracle"].to_json(),
        "sam": runs["sam"].to_json(),
        "targets": {"sam_proposals_at_least_0.80": sam >= 0.80},
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(record, indent=2))
    print(f"wrote {a.out}")
    return 0 if all(record["targets"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
