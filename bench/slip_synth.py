"""The full SLIP pipeline, offline, end to end: the bundled model pair on held-out 2x2 composites.

    python -m bench.slip_synth              # --sam synth --clip synth, 200 composites; ~5 min on 2 CPU cores

The test images are a synthetic dataset generated with ``--seed`` (default 1): the bundled models were
trained on the seed-0 dataset, so no test image, object or background was seen in training. The
evaluation (``slip.evaluate``) is the paper's protocol, corrected: seeded 2x2 composites of four classes,
every class of every composite queried, judge-free scoring (the chosen segment lies mostly inside the
prompted class's tile), plus the IoU of the chosen segment with the prompted object's true mask. It runs
twice on the same composites:

* ``oracle`` — proposals are the ground-truth segments plus distractors: the ranker alone (the paper's
  setting);
* ``sam`` — proposals are the bundled SAM's automatic masks after the default annotation filters: the
  whole SLIP pipeline.

Equivalent CLI (``slip evaluate-local DATASET --ranker synth --proposals oracle|sam --sam synth``).
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
from slip.sam import recommended_filters, recommended_generator_params, resolve_filters

RESULTS = Path(__file__).parent / "results" / "slip_synth.json"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sam", default="synth", help="SAM spec of the proposals")
    p.add_argument("--clip", default="synth", help="ranker spec")
    p.add_argument("--seed", type=int, default=1, help="seed of the held-out dataset and its composites")
    p.add_argument("--per-class", type=int, default=25, help="held-out images per class (20 %% go to composites)")
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
    common = dict(composites=a.composites, seed=a.seed, tile_size=128, device="cpu", progress=True)
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
    print(f"\nfull SLIP (SAM proposals) {sam:.1%} vs oracle proposals {oracle:.1%} (target >= 80 %); "
          f"{seconds['sam'] / a.composites * 1000:.0f} ms per composite with SAM; report: {report}")
    record = {
        "command": "python -m bench.slip_synth " + " ".join(sys.argv[1:]),
        "args": {k: str(v) for k, v in vars(a).items()},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "generator": recommended_generator_params(a.sam),
        "filters": resolve_filters(a.filters, recommended_filters(a.sam)),
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
