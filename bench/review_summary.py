"""The review bench's figures (:mod:`bench.review`): medians with [min, max] over runs, win shares between arms, and
``--pool``: results of the same job from several starting rankers in one record, with doubt minus random per starting
ranker and a bootstrap interval of its mean.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import numpy as np

BOOTSTRAP = 10_000  # resamples of the starting rankers for the interval of the mean difference
MIN_BOOTSTRAP = 3  # starting rankers an interval needs (resampling 1 or 2 values gives no interval worth the name)


def spread(values) -> dict:
    """Median, min, max and count of ``values`` (None values left out; None figures without any)."""
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "runs": 0}
    return {"median": float(statistics.median(values)), "min": float(min(values)), "max": float(max(values)),
            "runs": len(values)}


def pairs(mine, theirs) -> list[float]:
    """Per (mine, theirs) pair: 1 where mine is higher, 0.5 for a tie, 0 where lower."""
    return [(x > y) + 0.5 * (x == y) for x in mine for y in theirs]


def share(outcomes: list[float]) -> float | None:
    """The mean of :func:`pairs` outcomes (the share mine wins, ties counting half); None without any."""
    return float(np.mean(outcomes)) if outcomes else None


def win_share(mine, theirs) -> float | None:
    """The share of (mine, theirs) pairs where mine is higher, ties counting half; None without pairs."""
    return share(pairs(mine, theirs))


def pool(files: list[Path], out: Path) -> int:
    """One record over results of the same job and orderings run with different starting rankers: each arm's
    runs pooled (medians, [min, max]), wins counted between runs of the same starting ranker only (the starting
    ranker is what both arms share), and per starting ranker its arms' medians (files of one starting ranker
    merged first: :func:`merged`). Writes ``out``."""
    files, records = merged([Path(f) for f in files], [json.loads(Path(f).read_text()) for f in files])
    jobs = {json.dumps({k: r["job"][k] for k in ("images", "classes", "unseen_by_start_ranker", "class_weights")})
            for r in records}
    if len(jobs) != 1:
        raise SystemExit(f"--pool: the results are of different jobs ({', '.join(map(str, files))})")
    arm = lambda name: "random" if name.startswith("random") else name  # noqa: E731
    sizes = sorted({n for r in records for by_n in r["runs"].values() for n in by_n}, key=int)
    arms = sorted({arm(name) for r in records for name in r["runs"]}, key=lambda x: (x == "random", x))

    def runs(r, a_, n):
        return [rec for name, by_n in r["runs"].items() if arm(name) == a_ for rec in by_n.get(n, {}).values()]

    curves = {a_: {"0": spread([r["curves_rest"]["random"]["0"]["median"] for r in records]),
                   **{n: spread([x["accuracy_rest"] for r in records for x in runs(r, a_, n)]) for n in sizes}}
              for a_ in arms}
    gain = {a_: {n: spread([x["accuracy_rest"] - x["start_accuracy_rest"] for r in records for x in runs(r, a_, n)])
                 for n in sizes} for a_ in arms}
    errors = {a_: {n: spread([x.get("start_errors_in_reviewed") for r in records for x in runs(r, a_, n)])
                   for n in sizes} for a_ in arms}  # what reviewers correct: the starting ranker's misses they see
    wins = {}
    for a_ in arms[:-1]:
        wins[a_] = {}
        for n in sizes:
            wins[a_][n] = share([p for r in records for p in pairs([v["accuracy_rest"] for v in runs(r, a_, n)],
                                                                    [v["accuracy_rest"] for v in runs(r, "random", n)])])
    per_start = [{"file": str(f), "start_ranker": r["start_ranker"]["path"], "args_start_seed": r["args"].get("start_seed", "0"),
                  "machine": r["machine"], "accuracy_at_0": r["curves_rest"]["random"]["0"]["median"],
                  "medians": {a_: {n: spread([x["accuracy_rest"] for x in runs(r, a_, n)])["median"] for n in sizes}
                              for a_ in arms}} for f, r in zip(files, records)]
    differences = {a_: {n: difference(per_start, a_, n) for n in sizes} for a_ in arms[:-1]}
    targets = {}
    if "doubt" in arms:
        if "50" in sizes:
            targets["doubt_50_gain_on_rest_at_least_10_points"] = gain["doubt"]["50"]["median"] >= 0.10
        for n in ("25", "50"):
            if n in sizes:
                targets[f"doubt_beats_random_at_{n}_rest_median"] = curves["doubt"][n]["median"] > curves["random"][n]["median"]
    record = {
        "command": "python -m bench.review " + " ".join(sys.argv[1:]),
        "pooled": [str(f) for f in files],
        "job": records[0]["job"], "accuracy": records[0]["accuracy"],
        "arms": {"what": "each arm's runs over every starting ranker: a rule = its ordering (per starting ranker) fine-tuned "
                         "with each seed; random = each random ordering fine-tuned with each seed; median, min, max",
                 "runs_per_arm": {a_: curves[a_][sizes[0]]["runs"] for a_ in arms}},
        "curves_rest": curves, "gain_over_start_on_same_rest": gain,
        "start_errors_in_reviewed": errors,
        "start_errors_what": "objects of the reviewed images the starting ranker answered wrong (of 4 per image)",
        "win_share_vs_random_rest": wins,
        "win_share_what": "share of (rule run, random run) pairs of the same starting ranker the rule wins, ties half",
        "difference_vs_random": differences,
        "difference_what": f"per starting ranker, the rule's median minus random's (accuracy on the rest, points of 1.0); "
                           f"their mean and a 95 % bootstrap interval of it over the starting rankers ({BOOTSTRAP} "
                           f"resamples, seeded): does the rule beat random beyond the starting ranker's draw?",
        "per_start_ranker": per_start, "targets": targets,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print_table(record)
    print("the starting ranker's errors in the reviewed images (median): " + "; ".join(
        f"{a_} " + ", ".join(f"{n}: {v['median']:.0f}" for n, v in row.items() if v["median"] is not None)
        for a_, row in errors.items()))
    for a_, row in differences.items():
        print(f"{a_} minus random, mean over starting rankers [95 % bootstrap]: " + "; ".join(
            f"{n}: {d['mean']:+.1%} " + (f"[{d['ci95'][0]:+.1%}, {d['ci95'][1]:+.1%}]" if d["ci95"] else "[too few rankers]")
            + f", above on {d['rankers_above']} of "
            f"{len(d['per_ranker'])}" for n, d in row.items() if d["mean"] is not None))
    for s_ in per_start:
        print(f"{s_['start_ranker']} ({s_['file']}): " + "; ".join(
            f"{a_} " + ", ".join(f"{n}: {v:.1%}" for n, v in row.items() if v is not None)
            for a_, row in s_["medians"].items() if any(v is not None for v in row.values())))
    print(f"wrote {out}")
    return 0 if all(targets.values()) else 1


def merged(files: list[Path], records: list[dict]) -> tuple[list[str], list[dict]]:
    """Results of the same starting ranker (its path and threshold) as one record, arm by arm: another rule run
    later from the same ranker joins its earlier runs. A run both hold (same ordering, size and seed) must agree
    on the accuracy to the digit, or the two are not the same ranker (another machine's BLAS) and nothing is pooled."""
    groups: dict[str, tuple[list[str], dict]] = {}
    for f, r in zip(files, records):
        key = json.dumps([r["start_ranker"]["path"], r["start_ranker"].get("threshold")])
        if key not in groups:
            runs = {name: {n: dict(seeds) for n, seeds in by_n.items()} for name, by_n in r["runs"].items()}
            groups[key] = ([str(f)], {**r, "runs": runs})
            continue
        names, into = groups[key]
        for name, by_n in r["runs"].items():
            for n, seeds in by_n.items():
                for seed, rec in seeds.items():
                    have = into["runs"].setdefault(name, {}).setdefault(n, {}).setdefault(seed, rec)
                    if have["accuracy_rest"] != rec["accuracy_rest"]:
                        raise SystemExit(f"--pool: {names[0]} and {f} disagree on {name} N={n} seed {seed} ("
                                         f"{have['accuracy_rest']} vs {rec['accuracy_rest']}): not the same starting "
                                         "ranker")
        names.append(str(f))
    return [" + ".join(names) for names, _ in groups.values()], [r for _, r in groups.values()]


def difference(per_start: list[dict], arm: str, n: str) -> dict:
    """``arm``'s median minus random's at ``n`` per starting ranker that has both; their mean with a 95 % bootstrap
    interval over the starting rankers (percentiles of :data:`BOOTSTRAP` seeded resamples; None with fewer than
    :data:`MIN_BOOTSTRAP`); None values without any."""
    diffs = [s["medians"][arm][n] - s["medians"]["random"][n] for s in per_start
             if s["medians"][arm][n] is not None and s["medians"]["random"][n] is not None]
    if not diffs:
        return {"per_ranker": [], "mean": None, "ci95": None, "rankers_above": 0}
    values = np.asarray(diffs)
    ci95 = None
    if len(values) >= MIN_BOOTSTRAP:
        means = values[np.random.default_rng(0).integers(0, len(values), (BOOTSTRAP, len(values)))].mean(1)
        ci95 = [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]
    return {"per_ranker": [round(float(d), 6) for d in diffs], "mean": float(values.mean()), "ci95": ci95,
            "rankers_above": int((values > 0).sum())}


def print_table(record: dict) -> None:
    def cell(d):
        if d["median"] is None:
            return "-"
        return f"{d['median']:.1%}" + ("" if d["runs"] == 1 else f" [{d['min']:.1%}, {d['max']:.1%}]")

    for title, key in (("object-level accuracy on the unreviewed rest", "curves_rest"),
                       ("on the images no ordering reviewed", "curves_common"),
                       ("on the rare classes' objects of the rest", "curves_rest_rare")):
        table = record.get(key)
        if not table:
            continue
        sizes = sorted({s for arm in table.values() for s in arm}, key=int)
        print(f"\n{title}: median [min, max] over the runs")
        print(f"{'reviewed':>12} " + " ".join(f"{s:>24}" for s in sizes))
        for arm, row in table.items():
            print(f"{arm:>12} " + " ".join(f"{cell(row[s]) if s in row else '':>24}" for s in sizes))
    print("share of (rule run, random run) pairs the rule wins: " + "; ".join(
        f"{arm} " + ", ".join(f"N={n}: {v:.0%}" for n, v in row.items() if v is not None) for arm, row in record["win_share_vs_random_rest"].items()))
    cost = record.get("requery_cost")
    if cost:
        print(f"re-answer with the new ranker from cached proposals: {cost['requery']['median_s'] * 1000:.0f} ms per "
              f"image vs {cost['first_pass']['median_s'] * 1000:.0f} ms first pass ({cost['ratio_median']:.1%})")
    print("targets: " + ", ".join(f"{k}={v}" for k, v in record["targets"].items()))
