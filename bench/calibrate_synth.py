"""Calibrate the bundled synth ranker's "present" threshold and measure it on held-out composites.

    python -m bench.calibrate_synth                 # ~10 min on a quiet 2-core CPU, offline
    python -m bench.calibrate_synth --write-bundle  # also writes slip/weights/synth-clip/threshold.json

Two synthetic datasets the bundled models never saw (they were trained on seed 0; bench.slip_synth tests
on seed 1): calibration composites from seed ``--seed`` (default 2) and held-out composites from seed
``--seed + 1``, all images of each composited. Each composite is queried with its 4 present classes and
with absent ones (``--absent-fraction`` of all queries, default 0.5). The threshold maximising F1 of
"present, and the chosen segment is the object" (:mod:`slip.calibrate`) is picked with oracle proposals
and with the bundled SAM's proposals; every threshold is then measured on the held-out composites of both
proposal kinds: precision / recall of "present", and the false-match rate when the class is absent.

The bundle's threshold.json is the SAM-proposal calibration (what the pipeline sees). Equivalent CLI:
``slip calibrate DATA --ranker synth --sam synth --split all --heldout HELDOUT --write --bundle``.
Writes ``bench/results/calibration.json``. (Run it as a module: ``bench/queue.py`` shadows ``queue``.)
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

from slip.calibrate import best_threshold, calibration_record, collect_probes, operating_point, write_threshold
from slip.data.synth import CLASS_NAMES, generate_dataset
from slip.evaluate import composite_source, sam_proposer
from slip.rankers.loading import load_ranker_bundle
from slip.weights import bundled_path

RESULTS = Path(__file__).parent / "results" / "calibration.json"
PROPOSALS = ("oracle", "sam")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clip", default="synth", help="ranker spec")
    p.add_argument("--sam", default="synth", help="SAM spec of the SAM proposals")
    p.add_argument("--seed", type=int, default=2, help="seed of the calibration dataset (held out: seed + 1)")
    p.add_argument("--per-class", type=int, default=8, help="images per class of each dataset")
    p.add_argument("--composites", type=int, default=150, help="composites to calibrate on (and as many held out)")
    p.add_argument("--absent-fraction", type=float, default=0.5, help="share of queries naming an absent class")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--write-bundle", action="store_true", help="write the SAM calibration to the bundled ranker")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args()


def main() -> int:
    a = parse_args()
    torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="slip-calibrate-"))
    start = time.perf_counter()
    # 1. two unseen datasets: calibration and held-out composites
    fit_data, test_data = (generate_dataset(work / name, classes=len(CLASS_NAMES), per_class=a.per_class, size=128,
                                            seed=seed) for name, seed in (("fit", a.seed), ("heldout", a.seed + 1)))
    fit, test = (composite_source(d, seed=s, split="all", tile_size=128)
                 for d, s in ((fit_data, a.seed), (test_data, a.seed + 1)))
    bundle = load_ranker_bundle(a.clip, device="cpu")
    proposers = {"oracle": None, "sam": sam_proposer(a.sam, device="cpu")}
    # 2. probes (present and absent queries, best segment of each) per proposal kind and dataset
    probes, seconds = {}, {}
    for kind in PROPOSALS:
        t = time.perf_counter()
        for name, source in (("fit", fit), ("heldout", test)):
            probes[kind, name] = collect_probes(bundle.ranker, source, source.take(a.composites), proposer=proposers[kind],
                                                absent_fraction=a.absent_fraction, seed=source.seed, progress=True)
        seconds[kind] = round(time.perf_counter() - t, 1)
    # 3. the best-F1 threshold of each kind; 4. every threshold on both kinds of held-out composites
    points = {kind: best_threshold(probes[kind, "fit"]) for kind in PROPOSALS}
    table = {f"{kind}_threshold": {f"heldout_{other}": operating_point(probes[other, "heldout"], points[kind].threshold).to_json()
                                   for other in PROPOSALS} for kind in PROPOSALS}
    setting = {"composites": a.composites, "dataset": f"synthetic seed {a.seed}, {a.per_class} images per class",
               "split": "all", "seed": a.seed, "absent_fraction": a.absent_fraction}
    records = {kind: calibration_record(points[kind], operating_point(probes[kind, "heldout"], points[kind].threshold),
                                        setting={**setting, "proposals": kind, "sam": a.sam if kind == "sam" else None},
                                        heldout={"dataset": f"synthetic seed {a.seed + 1}, {a.per_class} images per class",
                                                 "split": "all", "seed": a.seed + 1, "composites": a.composites},
                                        ranker=a.clip, ranker_sha256=bundle.ref.sha256) for kind in PROPOSALS}
    print(f"\n{'calibrated on':<14} {'threshold':>9}  held-out: {'proposals':<9} {'precision':>9} {'recall':>7} "
          f"{'F1':>6} {'absent FM':>9}")
    for kind in PROPOSALS:
        for other, row in table[f"{kind}_threshold"].items():
            print(f"{kind:<14} {points[kind].threshold:>9.4f}            {other[8:]:<9} {row['precision']:>9.1%} "
                  f"{row['recall']:>7.1%} {row['f1']:>6.3f} {row['absent_false_match_rate']:>9.1%}")
    record = {
        "command": "python -m bench.calibrate_synth " + " ".join(sys.argv[1:]),
        "args": {k: str(v) for k, v in vars(a).items()},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "seconds": {**seconds, "total": round(time.perf_counter() - start, 1)},
        "metric": "F1 of 'present and the chosen segment is the object'; absent FM = absent-class queries answered",
        "calibrations": records,
        "heldout_table": table,
        "bundled": "sam",
    }
    if a.write_bundle:
        path = write_threshold(bundled_path("synth-clip"), records["sam"])
        print(f"wrote {path}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
